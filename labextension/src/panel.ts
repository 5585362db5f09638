/**
 * The left sidebar: every job of the tfos job store, newest first, refreshed every 2 s
 * while the panel is visible.
 */

import { SidePanel, ToolbarButton, refreshIcon } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Poll } from '@lumino/polling';
import { Panel, Widget } from '@lumino/widgets';

import { IJobSummary, TfosClient, errorMessage, isUnreachable } from './api';
import { LossSeries, sparkline } from './chart';
import { el, progressBar, stateBadge } from './dom';
import { formatGpu, formatLoss, formatRate, formatWhen } from './format';

/** What the list shows: the jobs, or why there are none to show. */
export type ListState =
  | { kind: 'loading' }
  | { kind: 'jobs'; jobs: IJobSummary[] }
  | { kind: 'unreachable'; message: string }
  | { kind: 'error'; message: string };

export namespace JobsPanel {
  export interface IOptions {
    client: TfosClient;
    /** Opens a job's detail: called when a row is clicked, or activated from the keyboard. */
    open: (name: string) => void;
    /** Milliseconds between polls while the panel is visible. */
    interval?: number;
  }
}

/**
 * Seeding a row's sparkline costs one request for the job's loss history; a list
 * of many finished jobs is seeded a few rows per poll, so a poll stays short.
 */
const SEEDS_PER_POLL = 5;

/** The sparkline curve of one job, and the run it belongs to. */
interface ISeriesEntry {
  run: number;
  series: LossSeries;
  seeded: boolean;
}

export class JobsPanel extends SidePanel {
  constructor(options: JobsPanel.IOptions) {
    super({ content: new Panel() });
    this._client = options.client;
    this._open = options.open;
    this.addClass('tfos-JobsPanel');
    this.title.caption = 'tfos jobs';

    const title = el('h2', 'jp-text-truncated', 'tfos jobs');
    this.header.addWidget(new Widget({ node: el('div', '', title) }));
    this.toolbar.addItem(
      'refresh',
      new ToolbarButton({
        icon: refreshIcon,
        tooltip: 'Refresh the jobs',
        onClick: () => void this.refresh()
      })
    );
    this._body = new Widget({ node: el('div', 'tfos-JobsPanel-body') });
    this._body.node.addEventListener('click', this);
    this._body.node.addEventListener('keydown', this);
    this.addWidget(this._body);

    this._poll = new Poll({
      factory: () => this._fetch(),
      frequency: {
        interval: options.interval ?? 2000,
        // A server that does not answer is asked less and less often, up to every 30 s.
        backoff: true,
        max: 30 * 1000
      },
      name: 'tfos-magic:jobs',
      // Asleep while the panel is collapsed, or while the browser tab is hidden.
      standby: () => (this.isVisible ? 'when-hidden' : true)
    });
    this._render();
  }

  /** What the panel shows now. */
  get state(): ListState {
    return this._state;
  }

  /** Polls now, and resolves once the list shows the answer. */
  async refresh(): Promise<void> {
    await this._poll.refresh();
    await this._poll.tick;
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._poll.dispose();
    this._body.node.removeEventListener('click', this);
    this._body.node.removeEventListener('keydown', this);
    super.dispose();
  }

  /** Row clicks and keys, delegated to the list's node (DOM EventListener interface). */
  handleEvent(event: Event): void {
    const row = (event.target as HTMLElement).closest<HTMLElement>('[data-job]');
    if (row?.dataset.job === undefined) {
      const retry = (event.target as HTMLElement).closest('.tfos-JobsPanel-retry');
      if (retry && event.type === 'click') {
        void this.refresh();
      }
      return;
    }
    if (event.type === 'click') {
      this._open(row.dataset.job);
    } else if (
      event.type === 'keydown' &&
      ['Enter', ' '].includes((event as KeyboardEvent).key)
    ) {
      event.preventDefault();
      this._open(row.dataset.job);
    }
  }

  /** Shown again: catch up at once rather than at the next 2 s tick. */
  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this._poll.refresh();
  }

  private async _fetch(): Promise<void> {
    // A refresh can start while a tick's request is still out: the older answer is dropped.
    const generation = ++this._generation;
    let state: ListState;
    try {
      const jobs = await this._client.listJobs();
      await this._updateSeries(jobs);
      state = { kind: 'jobs', jobs };
    } catch (reason) {
      state = isUnreachable(reason)
        ? { kind: 'unreachable', message: errorMessage(reason) }
        : { kind: 'error', message: errorMessage(reason) };
      if (generation === this._generation) {
        this._state = state;
        this._render();
      }
      // Rejecting makes the poll back off while the server is away.
      throw reason;
    }
    if (generation === this._generation) {
      this._state = state;
      this._render();
    }
  }

  /** Extends each job's curve with its newest step, and seeds the curves not yet seeded. */
  private async _updateSeries(jobs: IJobSummary[]): Promise<void> {
    const names = new Set(jobs.map(job => job.name));
    for (const name of this._series.keys()) {
      if (!names.has(name)) {
        this._series.delete(name);
      }
    }
    let seeds = 0;
    for (const job of jobs) {
      let entry = this._series.get(job.name);
      // A new run starts a new curve.
      if (!entry || entry.run !== job.run) {
        entry = { run: job.run, series: new LossSeries(), seeded: job.step === null };
        this._series.set(job.name, entry);
      }
      if (!entry.seeded && seeds < SEEDS_PER_POLL) {
        seeds++;
        entry.seeded = true;
        try {
          entry.series.seed((await this._client.getJob(job.name)).loss_history);
        } catch {
          // The row still shows its numbers; the curve fills in from the next steps.
        }
      }
      entry.series.add(job.step, job.loss);
    }
  }

  private _render(): void {
    const body = this._body.node;
    const state = this._state;
    if (state.kind !== 'jobs' || state.jobs.length === 0) {
      this._rows.clear();
      body.replaceChildren(this._status(state));
      return;
    }
    let list = body.querySelector<HTMLUListElement>(':scope > .tfos-JobList');
    if (!list) {
      list = el('ul', 'tfos-JobList');
      list.setAttribute('aria-label', 'tfos jobs');
      body.replaceChildren(list);
    }
    // Rows are kept across polls, so focus and hover stay on the row under them.
    const rows = new Map<string, HTMLLIElement>();
    for (const job of state.jobs) {
      const row = this._rows.get(job.name) ?? el('li', 'tfos-JobRow');
      this._fillRow(row, job);
      rows.set(job.name, row);
    }
    list.replaceChildren(...rows.values());
    this._rows = rows;
  }

  private _fillRow(row: HTMLLIElement, job: IJobSummary): void {
    const points = this._series.get(job.name)?.series.points ?? [];
    // Nothing changed since the last poll: leave the row's DOM alone.
    const key = JSON.stringify([job, points.length, points[points.length - 1]]);
    if (row.dataset.key === key) {
      return;
    }
    row.dataset.key = key;
    row.dataset.job = job.name;
    row.tabIndex = 0;
    row.setAttribute('role', 'button');
    const updated = formatWhen(job.updated);
    row.title = `${job.name}: ${job.state}, updated ${updated.human}${
      job.stopped_early ? `\n${job.stopped_early}` : ''
    }${job.error ? `\n${job.error}` : ''}`;
    const stats = el(
      'div',
      'tfos-JobRow-stats',
      sparkline(points),
      el('span', 'tfos-JobRow-loss', `loss ${formatLoss(job.loss)}`)
    );
    for (const [cls, text] of [
      ['tfos-JobRow-rate', formatRate(job.rows_per_s)],
      ['tfos-JobRow-gpu', formatGpu(job.gpu_util)]
    ] as const) {
      if (text) {
        stats.append(el('span', cls, text));
      }
    }
    row.replaceChildren(
      el(
        'div',
        'tfos-JobRow-head',
        el('span', 'tfos-JobRow-name', job.name),
        stateBadge(job.state)
      ),
      progressBar(job),
      stats
    );
    if (job.stopped_early) {
      row.append(el('div', 'tfos-JobRow-note', job.stopped_early));
    }
    if (job.error) {
      row.append(el('div', 'tfos-JobRow-error', job.error));
    }
  }

  /** The panel's text when there is no row to show: loading, empty, or a problem. */
  private _status(state: ListState): HTMLElement {
    switch (state.kind) {
      case 'loading':
        return el('div', 'tfos-JobsPanel-status', 'Loading tfos jobs…');
      case 'jobs':
        return el(
          'div',
          'tfos-JobsPanel-status tfos-mod-empty',
          el('p', 'tfos-JobsPanel-statusTitle', 'No tfos jobs yet'),
          el(
            'p',
            '',
            'Run a cell with ',
            el('code', '', '%%tf_train JOB'),
            ' in a notebook (after ',
            el('code', '', '%load_ext tfos_magic'),
            '): the job shows here with its progress and loss.'
          )
        );
      case 'unreachable':
        return this._problem(
          'tfos server extension not reachable',
          'The sidebar reads the jobs from the tfos-magic server extension. Check that ' +
            'tfos-magic is installed in the Python environment that runs JupyterLab ' +
            '(`jupyter server extension list` shows tfos_magic enabled), then restart ' +
            'JupyterLab.',
          state.message
        );
      case 'error':
        return this._problem(
          'Could not read the tfos jobs',
          'The tfos server extension answered with an error.',
          state.message
        );
    }
  }

  private _problem(title: string, hint: string, detail: string): HTMLElement {
    const retry = el('button', 'jp-Button jp-mod-styled jp-mod-reject tfos-JobsPanel-retry', 'Retry');
    retry.type = 'button';
    return el(
      'div',
      'tfos-JobsPanel-status tfos-mod-error',
      el('p', 'tfos-JobsPanel-statusTitle', title),
      el('p', '', hint),
      detail ? el('p', 'tfos-JobsPanel-statusDetail', detail) : null,
      retry
    );
  }

  private readonly _client: TfosClient;
  private readonly _open: (name: string) => void;
  private readonly _body: Widget;
  private readonly _poll: Poll;
  private _state: ListState = { kind: 'loading' };
  private _generation = 0;
  private _rows = new Map<string, HTMLLIElement>();
  private readonly _series = new Map<string, ISeriesEntry>();
}
