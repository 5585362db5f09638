/**
 * The sidebar rendered from the server's JSON: a list of running, finished and failed
 * jobs; no jobs; and no server extension to ask.
 */

import { Widget } from '@lumino/widgets';

import { JobsPanel } from '../panel';
import broken from './fixtures/job-broken-etl.json';
import quickstart from './fixtures/job-quickstart.json';
import ratings from './fixtures/job-ratings-fm.json';
import jobs from './fixtures/jobs.json';
import { FakeServer, TOKEN, json } from './server';

const API = '/user/me/tfos/api';

function serverWithJobs(): FakeServer {
  return new FakeServer()
    .on('GET', `${API}/jobs`, jobs)
    .on('GET', `${API}/jobs/ratings-fm`, ratings)
    .on('GET', `${API}/jobs/quickstart`, quickstart)
    .on('GET', `${API}/jobs/broken-etl`, broken);
}

describe('JobsPanel', () => {
  let panel: JobsPanel;
  const opened: string[] = [];

  function show(server: FakeServer): JobsPanel {
    opened.length = 0;
    panel = new JobsPanel({ client: server.client(), open: name => opened.push(name) });
    // Attached means visible, and a visible panel polls.
    Widget.attach(panel, document.body);
    return panel;
  }

  const rows = (): HTMLElement[] =>
    Array.from(panel.node.querySelectorAll<HTMLElement>('.tfos-JobRow'));
  const row = (name: string): HTMLElement =>
    panel.node.querySelector<HTMLElement>(`.tfos-JobRow[data-job="${name}"]`)!;
  const text = (node: Element | null): string => node?.textContent ?? '';

  afterEach(() => {
    panel.dispose();
    jest.restoreAllMocks();
  });

  it('lists the jobs newest first, each with its state, progress, loss, rate and GPU', async () => {
    const server = serverWithJobs();
    await show(server).refresh();

    expect(rows().map(r => r.dataset.job)).toEqual(['ratings-fm', 'quickstart', 'broken-etl']);
    const badges = rows().map(r => r.querySelector('.tfos-StateBadge')!);
    expect(badges.map(b => b.textContent)).toEqual(['running', 'succeeded', 'failed']);
    expect(badges.map(b => b.classList.contains(`tfos-mod-${b.textContent}`))).toEqual([
      true,
      true,
      true
    ]);

    const running = row('ratings-fm');
    const bar = running.querySelector<HTMLElement>('[role="progressbar"]')!;
    expect(bar.getAttribute('aria-valuenow')).toBe('33');
    expect(running.querySelector<HTMLElement>('.tfos-Progress-fill')!.style.width).toBe('33.3%');
    expect(text(running.querySelector('.tfos-Progress-label'))).toBe('1/3 epochs · step 640');
    expect(text(running.querySelector('.tfos-JobRow-loss'))).toBe('loss 0.8123');
    expect(text(running.querySelector('.tfos-JobRow-rate'))).toBe('15k rows/s');
    expect(text(running.querySelector('.tfos-JobRow-gpu'))).toBe('GPU 87%');
    // The sparkline draws the loss history the server keeps (up to the current step).
    const line = running.querySelector('.tfos-Sparkline path')!;
    expect(line.getAttribute('d')!.split('L')).toHaveLength(ratings.loss_history.length);

    const finished = row('quickstart');
    expect(text(finished.querySelector('.tfos-Progress-label'))).toBe('3/5 epochs · step 1,875');
    // A callback of the cell ended it early: the row says when and why.
    expect(text(finished.querySelector('.tfos-JobRow-note'))).toBe(
      'Stopped early at epoch 3 of 5: EarlyStopping: val_loss did not improve for 1 epoch (best 0.04211).'
    );
    expect(running.querySelector('.tfos-JobRow-note')).toBeNull();
    expect(finished.querySelector('.tfos-JobRow-rate')).toBeNull();
    expect(finished.querySelector('.tfos-JobRow-gpu')).toBeNull();

    const failed = row('broken-etl');
    expect(text(failed.querySelector('.tfos-JobRow-error'))).toContain("Column 'rating' has 3 null");
    expect(failed.title).toContain('broken-etl: failed');
  });

  it('asks the API under the server base URL, with the server token', async () => {
    const server = serverWithJobs();
    await show(server).refresh();

    expect(server.paths()[0]).toBe(`${API}/jobs`);
    expect(server.paths()).toContain(`${API}/jobs/ratings-fm`);
    expect(server.requests.every(r => r.authorization === `token ${TOKEN}`)).toBe(true);
  });

  it('seeds each curve once, then extends it from the list', async () => {
    const server = serverWithJobs();
    await show(server).refresh();
    const further = JSON.parse(JSON.stringify(jobs));
    further.jobs[0].step = 700;
    further.jobs[0].loss = 0.75;
    server.on('GET', `${API}/jobs`, further);
    await panel.refresh();

    expect(server.paths().filter(p => p === `${API}/jobs/ratings-fm`)).toHaveLength(1);
    const line = row('ratings-fm').querySelector('.tfos-Sparkline path')!;
    expect(line.getAttribute('d')!.split('L')).toHaveLength(ratings.loss_history.length + 1);
    expect(text(row('ratings-fm').querySelector('.tfos-JobRow-loss'))).toBe('loss 0.75');
  });

  it('opens a job on click and on Enter', async () => {
    await show(serverWithJobs()).refresh();

    row('quickstart').querySelector<HTMLElement>('.tfos-JobRow-name')!.click();
    row('broken-etl').dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true }));

    expect(opened).toEqual(['quickstart', 'broken-etl']);
  });

  it('says how to start a job when there is none', async () => {
    await show(new FakeServer().on('GET', `${API}/jobs`, { jobs: [] })).refresh();

    expect(rows()).toHaveLength(0);
    expect(panel.state).toEqual({ kind: 'jobs', jobs: [] });
    const status = panel.node.querySelector('.tfos-JobsPanel-status')!;
    expect(status.textContent).toContain('No tfos jobs yet');
    expect(status.textContent).toContain('%%tf_train JOB');
  });

  it('says the server extension is not reachable when the server is down', async () => {
    const server = serverWithJobs();
    server.down = true;
    await show(server).refresh();

    expect(panel.state.kind).toBe('unreachable');
    const status = panel.node.querySelector('.tfos-JobsPanel-status.tfos-mod-error')!;
    expect(status.textContent).toContain('tfos server extension not reachable');
    expect(status.textContent).toContain('jupyter server extension list');
  });

  it('says the same when the server has no tfos API (extension not installed)', async () => {
    // JupyterLab logs the HTML of the server's 404 page at debug level: expected here.
    jest.spyOn(console, 'debug').mockImplementation(() => undefined);
    await show(new FakeServer()).refresh();

    expect(panel.state.kind).toBe('unreachable');
    expect(text(panel.node.querySelector('.tfos-JobsPanel-statusTitle'))).toBe(
      'tfos server extension not reachable'
    );
  });

  it('shows the server error of a failing API, and lists again once it answers', async () => {
    const server = new FakeServer().on('GET', `${API}/jobs`, () =>
      json({ message: 'job store unreadable: permission denied' }, 500)
    );
    await show(server).refresh();

    expect(panel.state.kind).toBe('error');
    expect(text(panel.node.querySelector('.tfos-JobsPanel-status'))).toContain(
      'job store unreadable: permission denied'
    );

    server.on('GET', `${API}/jobs`, { jobs: [] });
    panel.node.querySelector<HTMLElement>('.tfos-JobsPanel-retry')!.click();
    await panel.refresh();
    expect(panel.state.kind).toBe('jobs');
  });
});
