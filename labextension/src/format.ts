/**
 * How numbers, times and progress read in the sidebar: one place, so the list and the
 * detail view word them the same way.
 */

import { Time } from '@jupyterlab/coreutils';

import { IJobSummary, JobState } from './api';

/** Every state the server may send, for the badge; anything else reads as `unknown`. */
const STATES: ReadonlySet<JobState> = new Set<JobState>([
  'registered',
  'running',
  'succeeded',
  'failed',
  'stopped',
  'interrupted'
]);

/** The state's CSS modifier; a state this front end does not know gets a neutral one. */
export function stateClass(state: string): string {
  return `tfos-mod-${STATES.has(state as JobState) ? state : 'unknown'}`;
}

/** A loss with 4 significant digits, in exponent form when it is tiny or huge. */
export function formatLoss(loss: number | null | undefined): string {
  if (loss === null || loss === undefined || !Number.isFinite(loss)) {
    return '–';
  }
  const size = Math.abs(loss);
  if (size !== 0 && (size < 1e-3 || size >= 1e5)) {
    return loss.toExponential(2);
  }
  return Number(loss.toPrecision(4)).toString();
}

/** 950, 12.3k, 4.5M: a rate that fits in a sidebar row. */
export function formatCount(value: number): string {
  const size = Math.abs(value);
  if (size >= 1e6) {
    return `${(value / 1e6).toFixed(size >= 1e7 ? 0 : 1)}M`;
  }
  if (size >= 1e3) {
    return `${(value / 1e3).toFixed(size >= 1e4 ? 0 : 1)}k`;
  }
  return Math.round(value).toString();
}

export function formatRate(rowsPerSecond: number | null): string | null {
  if (rowsPerSecond === null || !Number.isFinite(rowsPerSecond)) {
    return null;
  }
  return `${formatCount(rowsPerSecond)} rows/s`;
}

export function formatGpu(util: number | null): string | null {
  if (util === null || !Number.isFinite(util)) {
    return null;
  }
  return `GPU ${Math.round(util)}%`;
}

/** "3 minutes ago", with the exact time for a tooltip; Unix seconds in. */
export function formatWhen(seconds: number | null): { human: string; exact: string } {
  if (seconds === null || !Number.isFinite(seconds)) {
    return { human: '–', exact: '' };
  }
  const date = new Date(seconds * 1000);
  // The server's clock may run ahead of the browser's: a moment "from now" reads as now
  // (formatHuman words a future time oddly, as "next year").
  const past = new Date(Math.min(date.getTime(), Date.now()));
  return { human: Time.formatHuman(past), exact: Time.format(date) };
}

/**
 * How far a job is, as a fraction for the bar and a label. The number of steps in an
 * epoch is not known before one ends (the rows reach each worker as a stream), so the
 * bar counts finished epochs and the label adds the step.
 */
export function progress(job: IJobSummary): { fraction: number; label: string } {
  const step = job.step === null ? 'no step yet' : `step ${job.step.toLocaleString('en-US')}`;
  if (!job.epochs) {
    return { fraction: job.state === 'succeeded' ? 1 : 0, label: step };
  }
  // A job that succeeded did all its epochs, even one whose last epoch event is missing,
  // unless a callback of its cell stopped it early: then it is done at the epoch it reached.
  const succeeded = job.state === 'succeeded';
  const done =
    succeeded && !job.stopped_early ? job.epochs : Math.min(job.epoch || 0, job.epochs);
  return {
    fraction: succeeded ? 1 : Math.max(0, done / job.epochs),
    label: `${done}/${job.epochs} epochs · ${step}`
  };
}
