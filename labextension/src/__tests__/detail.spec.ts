/**
 * One job's view from the server's JSON: curve, checkpoints, options, error, the events
 * read incrementally, opening the notebook and stopping the job.
 */

import { Widget } from '@lumino/widgets';

import { IJobDetail } from '../api';
import { JobDetailView, describeEvent } from '../detail';
import events1 from './fixtures/events-1.json';
import events2 from './fixtures/events-2.json';
import broken from './fixtures/job-broken-etl.json';
import ratings from './fixtures/job-ratings-fm.json';
import { FakeServer, json } from './server';

const API = '/user/me/tfos/api';

describe('JobDetailView', () => {
  let view: JobDetailView;
  let opened: Array<[string, string | null]>;

  function show(server: FakeServer, name: string, openNotebook?: JobDetailView.IOptions['openNotebook']): JobDetailView {
    opened = [];
    view = new JobDetailView({
      client: server.client(),
      name,
      openNotebook:
        openNotebook ??
        (async (path, cellId) => {
          opened.push([path, cellId]);
        })
    });
    Widget.attach(view, document.body);
    return view;
  }

  const $ = <T extends Element = HTMLElement>(selector: string): T | null =>
    view.node.querySelector<T>(selector);
  const text = (selector: string): string => $(selector)?.textContent ?? '';
  const button = (label: string): HTMLButtonElement | undefined =>
    Array.from(view.node.querySelectorAll('button')).find(b => b.textContent === label);
  const tableRows = (section: string): string[][] =>
    Array.from(view.node.querySelectorAll(`${section} tbody tr`)).map(tr =>
      Array.from(tr.querySelectorAll('td')).map(td => td.textContent ?? '')
    );

  function runningServer(): FakeServer {
    return new FakeServer()
      .on('GET', `${API}/jobs/ratings-fm`, ratings)
      .on('GET', `${API}/jobs/ratings-fm/events`, (url: URL) =>
        json(url.searchParams.get('offset') === '0' ? events1 : events2)
      );
  }

  afterEach(() => view.dispose());

  it('shows a running job: state, curve, checkpoints, epochs, options and events', async () => {
    await show(runningServer(), 'ratings-fm').refresh();

    expect(text('.tfos-JobDetail-name')).toBe('ratings-fm');
    expect(text('.tfos-StateBadge')).toBe('running');
    expect(text('.tfos-JobDetail-meta')).toBe('run 2 · attempt 1 · 2 workers');
    expect(text('.tfos-JobDetail-facts')).toBe('loss 0.8123 · 15k rows/s · GPU 87%');
    expect(button('Open notebook')!.disabled).toBe(false);
    expect(button('Stop')!.disabled).toBe(false);
    expect($('.tfos-LossChart path.tfos-LossChart-line')!.getAttribute('d')!.split('L')).toHaveLength(
      ratings.loss_history.length
    );
    expect(text('.tfos-LossChart')).toContain('step 640');
    // Newest checkpoint first.
    expect(tableRows('.tfos-JobDetail-checkpoints').map(r => [r[0], r[2], r[4]])).toEqual([
      ['600', 'schedule', '/jobs/ratings-fm/checkpoints/ckpt-600'],
      ['320', 'epoch', '/jobs/ratings-fm/checkpoints/ckpt-320']
    ]);
    expect(tableRows('.tfos-JobDetail-history')).toEqual([['1', '1.203', '1.15']]);
    expect(tableRows('.tfos-JobDetail-options')).toContainEqual(['batch_size', '512']);
    expect(tableRows('.tfos-JobDetail-options')).toContainEqual(['checkpoint_dir', '–']);
    // This run's events only, without the per-step ones.
    const events = Array.from(view.node.querySelectorAll('.tfos-JobDetail-event')).map(
      e => e.textContent ?? ''
    );
    expect(events).toHaveLength(2);
    expect(events[0]).toContain('worker 0: building the model');
    expect(events[1]).toContain('worker 0: TF process started');
    expect($('.tfos-JobDetail-failure')!.children).toHaveLength(0);
  });

  it('reads events from where it left off, and draws the chief step they bring', async () => {
    const server = runningServer();
    await show(server, 'ratings-fm').refresh();
    await view.refresh();

    expect(server.paths().filter(p => p.includes('/events'))).toEqual([
      `${API}/jobs/ratings-fm/events?offset=0`,
      `${API}/jobs/ratings-fm/events?offset=4`
    ]);
    // Worker 1's step and the older run's step were not drawn; the chief's step 672 is.
    expect(view.job!.step).toBe(672);
    expect(text('.tfos-JobDetail-facts')).toBe('loss 0.7911 · 16k rows/s · GPU 87%');
    expect($('.tfos-LossChart-line')!.getAttribute('d')!.split('L')).toHaveLength(
      ratings.loss_history.length + 1
    );
    expect(text('.tfos-LossChart')).toContain('step 672');
  });

  it('shows a failed job with its error, details and no stop button', async () => {
    const server = new FakeServer()
      .on('GET', `${API}/jobs/broken-etl`, broken)
      .on('GET', `${API}/jobs/broken-etl/events`, { events: [], offset: 0 });
    await show(server, 'broken-etl').refresh();

    expect(text('.tfos-StateBadge')).toBe('failed');
    expect(text('.tfos-JobDetail-meta')).toBe('run 1 · attempt 3 · 4 workers + 1 ps');
    expect(text('.tfos-JobDetail-errorText')).toBe(broken.error);
    expect(text('.tfos-JobDetail-errorDetails pre')).toContain('ValueError: rating has nulls');
    expect(button('Stop')).toBeUndefined();
    expect(button('Open notebook')!.disabled).toBe(true);
    expect(text('.tfos-JobDetail-checkpoints')).toContain('No checkpoints yet.');
  });

  it('stops a running job and shows the state it ends in', async () => {
    const server = runningServer().on('POST', `${API}/jobs/ratings-fm/stop`, () =>
      json({ state: 'running' }, 202)
    );
    await show(server, 'ratings-fm').refresh();

    const stopped: IJobDetail = { ...(ratings as IJobDetail), state: 'stopped' };
    server.on('GET', `${API}/jobs/ratings-fm`, stopped);
    const stopping = view.stop();
    expect(button('Stopping…')!.disabled).toBe(true);
    await stopping;

    expect(server.paths('POST')).toEqual([`${API}/jobs/ratings-fm/stop`]);
    expect(text('.tfos-StateBadge')).toBe('stopped');
    expect(button('Stop')).toBeUndefined();
    expect(button('Stopping…')).toBeUndefined();
    expect(text('.tfos-JobDetail-message')).toContain('Stop requested');
  });

  it("shows the server's answer when the job is no longer running", async () => {
    const server = runningServer().on('POST', `${API}/jobs/ratings-fm/stop`, () =>
      json({ message: "Job 'ratings-fm' is not running (it succeeded)." }, 409)
    );
    await show(server, 'ratings-fm').refresh();

    await view.stop();

    expect(text('.tfos-JobDetail-message.tfos-mod-error')).toBe(
      "Job 'ratings-fm' is not running (it succeeded)."
    );
    expect(button('Stop')!.disabled).toBe(false);
  });

  it('opens the notebook at the cell that ran the job', async () => {
    await show(runningServer(), 'ratings-fm').refresh();

    button('Open notebook')!.click();
    await Promise.resolve();

    expect(opened).toEqual([['examples/movielens.ipynb', 'train-cell']]);
  });

  it('says why the notebook could not be opened', async () => {
    await show(runningServer(), 'ratings-fm', async () => {
      throw new Error('examples/movielens.ipynb is open, but its cell train-cell is no longer in it.');
    }).refresh();

    await view.openNotebook();

    expect(text('.tfos-JobDetail-message.tfos-mod-error')).toContain('no longer in it');
  });

  it('says the server extension is not reachable', async () => {
    const server = runningServer();
    server.down = true;
    await show(server, 'ratings-fm').refresh();

    expect(text('.tfos-JobDetail-message.tfos-mod-error')).toContain(
      'tfos server extension not reachable'
    );
  });
});

describe('describeEvent', () => {
  it('words each kind of event for the event list', () => {
    expect(describeEvent({ kind: 'checkpoint', worker: 0, step: 600, reason: 'stop' })).toBe(
      'worker 0: checkpoint at step 600 (stop)'
    );
    expect(describeEvent({ kind: 'epoch', worker: 0, epoch: 2, step: 640, metrics: { loss: 0.51234 } })).toBe(
      'worker 0: epoch 2 done at step 640, loss 0.5123'
    );
    expect(describeEvent({ kind: 'finished', role: 'ps', worker: 1, status: 'ok' })).toBe(
      'ps 1: finished (ok)'
    );
    expect(describeEvent({ kind: 'something-new', worker: 2 })).toBe('worker 2: something-new');
  });
});
