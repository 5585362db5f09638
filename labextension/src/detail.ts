/**
 * One job in full: its loss curve, checkpoints, options and error, the events as they
 * arrive, a button to open the notebook cell that ran it and one to stop it.
 */

import { Message } from '@lumino/messaging';
import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

import {
  IEventsPage,
  IJobDetail,
  IJobEvent,
  ILossPoint,
  TfosClient,
  errorMessage,
  isUnreachable
} from './api';
import { LossSeries, lossChart } from './chart';
import { el, progressBar, stateBadge } from './dom';
import { formatGpu, formatLoss, formatRate, formatWhen } from './format';

export namespace JobDetailView {
  export interface IOptions {
    client: TfosClient;
    name: string;
    /** Opens the job's notebook, at its cell when `cellId` is given; rejects with a reason to show. */
    openNotebook: (path: string, cellId: string | null) => Promise<void>;
    /** Milliseconds between polls while the view is visible. */
    interval?: number;
  }
}

/**
 * Events are read every poll; the whole job (checkpoints, options, history) only every
 * few polls, or at once when an event says it changed, since a running job's steps
 * alone arrive by events.
 */
const DETAIL_EVERY = 5;
/** Kinds after which the job's stored record has changed. */
const CHANGES_RECORD = new Set([
  'started',
  'training',
  'epoch',
  'checkpoint',
  'stopping',
  'model',
  'stopped_early',
  'error',
  'finished'
]);
/** Kinds too frequent to list: they show as the curve and the numbers instead. */
const NOT_LISTED = new Set(['step', 'gpu']);
const MAX_LISTED = 200;

type Notice = { kind: 'info' | 'error'; text: string } | null;

/** One line of the event list, in the words a user reads. */
export function describeEvent(event: IJobEvent): string {
  const who = `${event.role === 'ps' ? 'ps' : 'worker'} ${event.worker ?? 0}`;
  const step = event.step !== undefined ? ` at step ${event.step}` : '';
  const loss = event.metrics?.loss;
  switch (event.kind) {
    case 'started':
      return `${who}: TF process started`;
    case 'training':
      return `${who}: training from step ${String(event.initial_step ?? 0)}${
        event.restored_from ? ` (restored ${String(event.restored_from)})` : ''
      }`;
    case 'epoch':
      return `${who}: epoch ${event.epoch ?? '?'} done${step}${
        typeof loss === 'number' ? `, loss ${formatLoss(loss)}` : ''
      }`;
    case 'checkpoint':
      return `${who}: checkpoint${step} (${String(event.reason ?? 'saved')})`;
    case 'stopping':
      return `${who}: stopping${step}`;
    case 'model':
      return `${who}: model saved to ${String(event.path ?? '?')}`;
    case 'stopped_early':
      return `${who}: stopped early after epoch ${String(event.epoch ?? '?')}: ${String(event.reason ?? '')}`;
    case 'log':
      return `${who}: ${String(event.text ?? '')}`;
    case 'error':
      return `${who}: error: ${String(event.message ?? '')}`;
    case 'finished':
      return `${who}: finished (${String(event.status ?? '?')})`;
    default:
      return `${who}: ${event.kind}`;
  }
}

export class JobDetailView extends Widget {
  constructor(options: JobDetailView.IOptions) {
    super();
    this.jobName = options.name;
    this._client = options.client;
    this._openNotebook = options.openNotebook;
    this.addClass('tfos-JobDetail');
    this.title.label = options.name;
    this.title.caption = `tfos job ${options.name}`;
    this.node.append(
      this._header,
      this._notice,
      this._summary,
      this._error,
      this._chart,
      this._checkpoints,
      this._history,
      this._options,
      this._events
    );
    this.node.addEventListener('click', this);
    this._poll = new Poll({
      factory: () => this._fetch(),
      frequency: { interval: options.interval ?? 2000, backoff: true, max: 30 * 1000 },
      name: `tfos-magic:job:${options.name}`,
      standby: () => (this.isVisible ? 'when-hidden' : true)
    });
    this._render();
  }

  readonly jobName: string;

  /** The job as last read, with the newest step seen in its events. */
  get job(): IJobDetail | null {
    return this._job;
  }

  /** Polls now, and resolves once the view shows the answer. */
  async refresh(): Promise<void> {
    await this._poll.refresh();
    await this._poll.tick;
  }

  /** Asks the server to stop the job, then shows the state it reports. */
  async stop(): Promise<void> {
    if (this._stopping) {
      return;
    }
    this._stopping = true;
    this._noticeValue = { kind: 'info', text: 'Asking the job to stop…' };
    this._render();
    try {
      const { state } = await this._client.stop(this.jobName);
      if (this._job) {
        this._job = { ...this._job, state };
      }
      this._noticeValue = {
        kind: 'info',
        text:
          state === 'running'
            ? 'Stop requested: the workers save a checkpoint, then the job stops.'
            : `The job is ${state}.`
      };
    } catch (reason) {
      // 409: it was not running (any more); the next read shows what it is.
      this._stopping = false;
      this._noticeValue = { kind: 'error', text: errorMessage(reason) };
    }
    this._render();
    await this.refresh();
  }

  /** Opens the notebook that ran the job, at the cell that ran it. */
  async openNotebook(): Promise<void> {
    const job = this._job;
    if (!job?.notebook_path) {
      return;
    }
    try {
      await this._openNotebook(job.notebook_path, job.cell_id);
    } catch (reason) {
      this._noticeValue = { kind: 'error', text: errorMessage(reason) };
      this._render();
    }
  }

  /** Button clicks, delegated to the view's node (DOM EventListener interface). */
  handleEvent(event: Event): void {
    const button = (event.target as HTMLElement).closest<HTMLButtonElement>('[data-action]');
    if (event.type !== 'click' || !button || button.disabled) {
      return;
    }
    if (button.dataset.action === 'stop') {
      void this.stop();
    } else if (button.dataset.action === 'open') {
      void this.openNotebook();
    }
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._poll.dispose();
    this.node.removeEventListener('click', this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this._poll.refresh();
  }

  private async _fetch(): Promise<void> {
    try {
      // The run must be known before events are sorted into this run's and older ones.
      const reread = this._job === null || this._stopping || ++this._polls % DETAIL_EVERY === 0;
      if (reread) {
        await this._readJob();
      }
      const page = await this._client.events(this.jobName, this._offset);
      if (this._readEvents(page) && !reread) {
        await this._readJob();
      }
      this._problem = null;
    } catch (reason) {
      this._problem = isUnreachable(reason)
        ? `tfos server extension not reachable (${errorMessage(reason)})`
        : errorMessage(reason);
      throw reason;
    } finally {
      this._render();
    }
  }

  private async _readJob(): Promise<void> {
    const job = await this._client.getJob(this.jobName);
    if (this._job && this._job.run !== job.run) {
      // A new run: its events start a new list.
      this._listed = [];
    }
    this._job = job;
    this._series.seed(job.loss_history);
    for (const point of this._recent) {
      this._series.add(point.step, point.loss);
    }
    if (job.state !== 'running') {
      this._stopping = false;
    }
  }

  /** Takes in a page of events; true when one of them changed the job's record. */
  private _readEvents(page: IEventsPage): boolean {
    this._offset = page.offset;
    const run = this._job?.run;
    let changed = false;
    for (const event of page.events) {
      if (run !== undefined && event.run !== undefined && event.run !== run) {
        continue;
      }
      changed = changed || CHANGES_RECORD.has(event.kind);
      const chief = (event.worker ?? 0) === 0 && event.role !== 'ps';
      if (event.kind === 'step' && chief && typeof event.step === 'number') {
        this._live(event);
      }
      if (!NOT_LISTED.has(event.kind)) {
        this._listed.push(event);
      }
    }
    this._listed = this._listed.slice(-MAX_LISTED);
    return changed;
  }

  /** The chief's newest step, shown before the next read of the whole job. */
  private _live(event: IJobEvent): void {
    const loss = event.metrics?.loss;
    const step = event.step as number;
    if (typeof loss === 'number' && this._series.add(step, loss)) {
      this._recent = [...this._recent, { step, loss }].slice(-LossSeries.MAX_POINTS);
    }
    const job = this._job;
    if (job && (job.step === null || step > job.step)) {
      const rate = event.metrics?.rows_per_s;
      this._job = {
        ...job,
        step,
        loss: typeof loss === 'number' ? loss : job.loss,
        rows_per_s: typeof rate === 'number' ? rate : job.rows_per_s
      };
    }
  }

  private _render(): void {
    const job = this._job;
    this.title.caption = job
      ? `tfos job ${this.jobName}: ${job.state}`
      : `tfos job ${this.jobName}`;
    fill(this._header, [this.jobName, job?.state, job?.run, job?.attempt, job?.workers, job?.ps,
      job?.notebook_path, job?.cell_id, this._stopping], () => this._headerContent(job));
    const notice = this._problem
      ? ({ kind: 'error', text: this._problem } as const)
      : this._noticeValue;
    fill(this._notice, notice, () =>
      notice ? [el('p', `tfos-JobDetail-message tfos-mod-${notice.kind}`, notice.text)] : []
    );
    if (!job) {
      fill(this._summary, 'loading', () =>
        this._problem ? [] : [el('p', 'tfos-JobDetail-muted', 'Loading…')]
      );
      return;
    }
    fill(this._summary, [job.state, job.epoch, job.epochs, job.step, job.loss, job.rows_per_s,
      job.gpu_util, job.started, job.updated, job.stopped_early], () => this._summaryContent(job));
    fill(this._error, [job.error, job.error_details], () => this._errorContent(job));
    const points = this._series.points;
    fill(this._chart, [points.length, points[0], points[points.length - 1]], () => [
      el('h3', '', 'Loss'),
      points.length
        ? lossChart(points, formatLoss)
        : el('p', 'tfos-JobDetail-muted', 'No loss reported yet.')
    ]);
    fill(this._checkpoints, job.checkpoints, () => this._checkpointsContent(job));
    fill(this._history, job.history, () => this._historyContent(job));
    fill(this._options, job.options, () => [
      el('h3', '', 'Options'),
      table(
        ['option', 'value'],
        Object.entries(job.options).map(([key, value]) => [
          key,
          value === null || value === undefined
            ? '–'
            : typeof value === 'string'
              ? value
              : JSON.stringify(value)
        ])
      )
    ]);
    fill(this._events, [this._listed.length, this._listed[this._listed.length - 1]], () =>
      this._eventsContent()
    );
  }

  private _headerContent(job: IJobDetail | null): Node[] {
    const open = el('button', 'jp-Button jp-mod-styled jp-mod-accept', 'Open notebook');
    open.type = 'button';
    open.dataset.action = 'open';
    open.disabled = !job?.notebook_path;
    open.title = job?.notebook_path
      ? `Open ${job.notebook_path}${job.cell_id ? ' at the cell that ran the job' : ''}`
      : 'The job was not run from a notebook this server knows';
    const actions = el('div', 'tfos-JobDetail-actions', open);
    if (job?.state === 'running') {
      const stop = el(
        'button',
        'jp-Button jp-mod-styled jp-mod-warn',
        this._stopping ? 'Stopping…' : 'Stop'
      );
      stop.type = 'button';
      stop.dataset.action = 'stop';
      stop.disabled = this._stopping;
      stop.title = 'Stop the job: its workers save a checkpoint first, so it can be resumed';
      actions.append(stop);
    }
    const title = el('h2', 'tfos-JobDetail-name', this.jobName);
    if (!job) {
      return [el('div', 'tfos-JobDetail-title', title), actions];
    }
    const cluster = `${job.workers} worker${job.workers === 1 ? '' : 's'}${
      job.ps ? ` + ${job.ps} ps` : ''
    }`;
    return [
      el('div', 'tfos-JobDetail-title', title, stateBadge(job.state)),
      el('p', 'tfos-JobDetail-meta', `run ${job.run} · attempt ${job.attempt} · ${cluster}`),
      actions
    ];
  }

  private _summaryContent(job: IJobDetail): Node[] {
    const started = formatWhen(job.started);
    const updated = formatWhen(job.updated);
    const facts = [
      `loss ${formatLoss(job.loss)}`,
      formatRate(job.rows_per_s),
      formatGpu(job.gpu_util)
    ].filter((fact): fact is string => fact !== null);
    const when = el('p', 'tfos-JobDetail-muted');
    when.append(
      'started ',
      timeText(started),
      ' · updated ',
      timeText(updated)
    );
    const early = job.stopped_early ? [el('p', 'tfos-JobDetail-note', job.stopped_early)] : [];
    const tracked = job.mlflow_link ? [mlflowLink(job.mlflow_link)] : [];
    return [progressBar(job), el('p', 'tfos-JobDetail-facts', facts.join(' · ')), ...early, ...tracked, when];
  }

  private _errorContent(job: IJobDetail): Node[] {
    if (!job.error && !job.error_details) {
      return [];
    }
    const nodes: Node[] = [el('h3', '', 'Error')];
    if (job.error) {
      nodes.push(el('p', 'tfos-JobDetail-errorText', job.error));
    }
    if (job.error_details) {
      const details = el(
        'details',
        'tfos-JobDetail-errorDetails',
        el('summary', '', 'Traceback and the TF process log'),
        el('pre', '', job.error_details)
      );
      // Kept open across refreshes once the user opened it.
      details.open = this._error.querySelector('details')?.open ?? false;
      nodes.push(details);
    }
    return nodes;
  }

  private _checkpointsContent(job: IJobDetail): Node[] {
    const rows = [...job.checkpoints]
      .sort((a, b) => b.step - a.step)
      .map(c => {
        const when = formatWhen(c.time);
        return [String(c.step), String(c.epoch), c.reason, timeText(when), codeText(c.path)];
      });
    return [
      el('h3', '', 'Checkpoints'),
      rows.length
        ? table(['step', 'epoch', 'reason', 'saved', 'path'], rows)
        : el('p', 'tfos-JobDetail-muted', 'No checkpoints yet.')
    ];
  }

  private _historyContent(job: IJobDetail): Node[] {
    if (!job.history.length) {
      return [];
    }
    // `epoch` first, then every metric any epoch reported, in the order first seen.
    const columns = ['epoch'];
    for (const row of job.history) {
      for (const key of Object.keys(row)) {
        if (!columns.includes(key)) {
          columns.push(key);
        }
      }
    }
    const cell = (value: number | string | null | undefined): string =>
      typeof value === 'number'
        ? Number.isInteger(value)
          ? String(value)
          : formatLoss(value)
        : (value ?? '–');
    return [
      el('h3', '', 'Epochs'),
      table(columns, job.history.map(row => columns.map(c => cell(row[c]))))
    ];
  }

  private _eventsContent(): Node[] {
    if (!this._listed.length) {
      return [];
    }
    const items = [...this._listed].reverse().map(event => {
      const item = el('li', `tfos-JobDetail-event tfos-mod-${event.kind}`);
      if (typeof event.time === 'number') {
        item.append(
          el('time', '', new Date(event.time * 1000).toLocaleTimeString()),
          ' '
        );
      }
      item.append(describeEvent(event));
      return item;
    });
    return [
      el('h3', '', 'Events'),
      el('ol', 'tfos-JobDetail-events', ...items)
    ];
  }

  private readonly _client: TfosClient;
  private readonly _openNotebook: (path: string, cellId: string | null) => Promise<void>;
  private readonly _poll: Poll;
  private readonly _series = new LossSeries();
  private readonly _header = el('header', 'tfos-JobDetail-header');
  private readonly _notice = el('div', 'tfos-JobDetail-notice');
  private readonly _summary = el('section', 'tfos-JobDetail-summary');
  private readonly _error = el('section', 'tfos-JobDetail-failure');
  private readonly _chart = el('section', 'tfos-JobDetail-chart');
  private readonly _checkpoints = el('section', 'tfos-JobDetail-checkpoints');
  private readonly _history = el('section', 'tfos-JobDetail-history');
  private readonly _options = el('section', 'tfos-JobDetail-options');
  private readonly _events = el('section', 'tfos-JobDetail-eventList');
  private _job: IJobDetail | null = null;
  private _offset = 0;
  private _polls = 0;
  private _listed: IJobEvent[] = [];
  /** The chief's steps from events, re-added over each (decimated) history the server sends. */
  private _recent: ILossPoint[] = [];
  private _stopping = false;
  private _problem: string | null = null;
  private _noticeValue: Notice = null;
}

/**
 * Rebuilds `node`'s children only when what they show (`key`) changed, so a poll that
 * brings nothing new leaves the DOM, its scroll and an open <details> as they are.
 */
function fill(node: HTMLElement, key: unknown, build: () => Node[]): void {
  const text = JSON.stringify(key) ?? '';
  if (node.dataset.key === text) {
    return;
  }
  node.dataset.key = text;
  node.replaceChildren(...build());
}

function timeText(when: { human: string; exact: string }): HTMLElement {
  const node = el('time', '', when.human);
  node.title = when.exact;
  return node;
}

function codeText(text: string): HTMLElement {
  const node = el('code', '', text);
  node.title = text;
  return node;
}

function table(columns: string[], rows: Array<Array<string | Node>>): HTMLTableElement {
  const head = el('tr', '', ...columns.map(c => el('th', '', c)));
  const body = rows.map(row => el('tr', '', ...row.map(value => el('td', '', value))));
  return el(
    'table',
    'tfos-JobDetail-table',
    el('thead', '', head),
    el('tbody', '', ...body)
  );
}

/** "MLflow: " and the run: a link to a tracking server's page, else the run and its store as text. */
function mlflowLink(link: string): HTMLParagraphElement {
  if (!/^https?:\/\//.test(link)) {
    return el('p', 'tfos-JobDetail-mlflow', `MLflow: ${link}`);
  }
  const anchor = el('a', '', link);
  anchor.href = link;
  anchor.target = '_blank';
  anchor.rel = 'noopener noreferrer';
  return el('p', 'tfos-JobDetail-mlflow', 'MLflow: ', anchor);
}
