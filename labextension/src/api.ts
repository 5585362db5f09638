/**
 * The tfos server extension's REST API (`<base_url>/tfos/api/`), typed as it answers.
 *
 * Requests go through `ServerConnection.makeRequest`, so the server's token and XSRF
 * cookie travel with them exactly as they do for JupyterLab's own services.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Where a job stands; `interrupted` is how a running job whose kernel died reads. */
export type JobState =
  | 'registered'
  | 'running'
  | 'succeeded'
  | 'failed'
  | 'stopped'
  | 'interrupted';

/** One job as the list shows it. */
export interface IJobSummary {
  name: string;
  state: JobState;
  run: number;
  attempt: number;
  notebook_path: string | null;
  cell_id: string | null;
  workers: number;
  ps: number;
  /** Finished epochs. */
  epoch: number;
  epochs: number;
  /** The chief's last step; null before the first one. */
  step: number | null;
  loss: number | null;
  rows_per_s: number | null;
  gpu_util: number | null;
  latest_checkpoint: string | null;
  /** Unix seconds; null for a job that never ran. */
  started: number | null;
  updated: number | null;
  error: string | null;
  /** A callback of the cell ended training before --epochs: at which epoch, and why. */
  stopped_early?: string | null;
  /** The MLflow run the job logs to: a tracking server's run page, or "run ID in STORE". */
  mlflow_link?: string | null;
}

export interface ICheckpoint {
  step: number;
  epoch: number;
  path: string;
  reason: string;
  time: number;
}

export interface ILossPoint {
  step: number;
  loss: number;
}

/** A per-epoch row of the job's history: `epoch` plus whatever metrics Keras reported. */
export type HistoryRow = { [metric: string]: number | string | null };

/** One job with everything the detail view shows. */
export interface IJobDetail extends IJobSummary {
  options: { [option: string]: unknown };
  error_details: string | null;
  checkpoints: ICheckpoint[];
  /** At most 500 points, decimated by the server. */
  loss_history: ILossPoint[];
  history: HistoryRow[];
}

/** A metric event of the job store (docs/metrics.md); readers ignore keys they do not know. */
export interface IJobEvent {
  kind: string;
  time?: number;
  worker?: number;
  role?: string;
  run?: number;
  attempt?: number;
  step?: number;
  epoch?: number;
  metrics?: { [metric: string]: number | null };
  [key: string]: unknown;
}

export interface IEventsPage {
  events: IJobEvent[];
  /** The offset to ask for next time: events are read incrementally. */
  offset: number;
}

/**
 * Whether a failed request means the tfos API is not there at all: the server is
 * down (a network error), the route is unknown (the server extension is not
 * installed or not enabled: jupyter_server answers 404), or a proxy in front of
 * it has no server to reach.
 */
export function isUnreachable(reason: unknown): boolean {
  if (reason instanceof ServerConnection.NetworkError) {
    return true;
  }
  if (reason instanceof ServerConnection.ResponseError) {
    return [404, 502, 503, 504].includes(reason.response.status);
  }
  return false;
}

/** The message of a failed request, as the server worded it when it did. */
export function errorMessage(reason: unknown): string {
  if (reason instanceof Error) {
    return reason.message;
  }
  return String(reason);
}

/** The client of the tfos REST API, bound to one Jupyter server. */
export class TfosClient {
  constructor(readonly serverSettings: ServerConnection.ISettings) {}

  /** All jobs, newest first. */
  async listJobs(): Promise<IJobSummary[]> {
    const body = await this._request<{ jobs: IJobSummary[] }>('jobs');
    return body.jobs;
  }

  async getJob(name: string): Promise<IJobDetail> {
    return this._request<IJobDetail>(`jobs/${encodeURIComponent(name)}`);
  }

  /** The job's events from `offset` on, and the offset to continue from. */
  async events(name: string, offset: number): Promise<IEventsPage> {
    return this._request<IEventsPage>(
      `jobs/${encodeURIComponent(name)}/events`,
      {},
      { offset }
    );
  }

  /**
   * Asks the job to stop (it checkpoints first). A job that is not running answers
   * 409, which arrives here as a `ResponseError` carrying the server's message.
   */
  async stop(name: string): Promise<{ state: JobState }> {
    return this._request<{ state: JobState }>(
      `jobs/${encodeURIComponent(name)}/stop`,
      { method: 'POST' }
    );
  }

  private async _request<T>(
    path: string,
    init: RequestInit = {},
    query?: { [key: string]: number | string }
  ): Promise<T> {
    const url =
      URLExt.join(this.serverSettings.baseUrl, 'tfos/api', path) +
      (query ? URLExt.objectToQueryString(query) : '');
    // makeRequest throws NetworkError itself when the server cannot be reached.
    const response = await ServerConnection.makeRequest(
      url,
      init,
      this.serverSettings
    );
    if (!response.ok) {
      // Reads the server's JSON `message` (and traceback) into the error.
      throw await ServerConnection.ResponseError.create(response);
    }
    return (await response.json()) as T;
  }
}
