/**
 * Loss curves as small inline SVG: a sparkline for a list row, a chart with its range
 * for the detail view. A few hundred points at most, so plain SVG paths; no chart
 * library to load into JupyterLab for this.
 */

import { ILossPoint } from './api';

const SVG_NS = 'http://www.w3.org/2000/svg';

/** The points with a finite loss, in step order. */
function usable(points: readonly ILossPoint[]): ILossPoint[] {
  return points
    .filter(p => Number.isFinite(p.step) && Number.isFinite(p.loss))
    .sort((a, b) => a.step - b.step);
}

/**
 * At most `max` points (`max` >= 2), keeping each bucket's lowest and highest loss,
 * so that a spike or a dip survives where plain sampling would drop it. The first
 * and last points are always kept.
 */
export function decimate(points: readonly ILossPoint[], max: number): ILossPoint[] {
  if (points.length <= max) {
    return points.slice();
  }
  const buckets = Math.max(1, Math.floor((max - 2) / 2));
  const inner = points.slice(1, -1);
  const size = inner.length / buckets;
  const out: ILossPoint[] = [points[0]];
  for (let b = 0; b < buckets; b++) {
    const bucket = inner.slice(Math.floor(b * size), Math.floor((b + 1) * size));
    if (bucket.length === 0) {
      continue;
    }
    let lo = bucket[0];
    let hi = bucket[0];
    for (const p of bucket) {
      if (p.loss < lo.loss) {
        lo = p;
      }
      if (p.loss > hi.loss) {
        hi = p;
      }
    }
    // In step order, so the line does not double back.
    out.push(...(lo === hi ? [lo] : lo.step < hi.step ? [lo, hi] : [hi, lo]));
  }
  out.push(points[points.length - 1]);
  return out;
}

interface IBox {
  width: number;
  height: number;
  /** Space kept free inside the box, for the stroke and labels. */
  pad: { top: number; right: number; bottom: number; left: number };
}

/** The SVG path of `points` scaled into `box`. */
export function linePath(points: readonly ILossPoint[], box: IBox): string {
  if (points.length === 0) {
    return '';
  }
  const steps = points.map(p => p.step);
  const losses = points.map(p => p.loss);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  const [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  const w = box.width - box.pad.left - box.pad.right;
  const h = box.height - box.pad.top - box.pad.bottom;
  // A single point or a flat loss draws a level line across the middle, not a NaN.
  const x = (s: number) => box.pad.left + (x1 > x0 ? ((s - x0) / (x1 - x0)) * w : w / 2);
  const y = (l: number) => box.pad.top + (y1 > y0 ? (1 - (l - y0) / (y1 - y0)) * h : h / 2);
  const coords = points.map(p => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`);
  if (coords.length === 1) {
    // A lone point: a short level stroke, visible where a zero-length line is not.
    const [px, py] = coords[0].split(',').map(Number);
    return `M${(px - 2).toFixed(1)},${py.toFixed(1)}H${(px + 2).toFixed(1)}`;
  }
  return `M${coords.join('L')}`;
}

function svg(width: number, height: number, cls: string): SVGSVGElement {
  const node = document.createElementNS(SVG_NS, 'svg');
  node.setAttribute('class', cls);
  node.setAttribute('viewBox', `0 0 ${width} ${height}`);
  node.setAttribute('width', String(width));
  node.setAttribute('height', String(height));
  return node;
}

function child<K extends keyof SVGElementTagNameMap>(
  parent: SVGElement,
  tag: K,
  attrs: { [name: string]: string }
): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    node.setAttribute(name, value);
  }
  parent.appendChild(node);
  return node;
}

/** A row's sparkline: the curve's shape only, no axes. Empty when there is no loss. */
export function sparkline(
  points: readonly ILossPoint[],
  width = 72,
  height = 18
): SVGSVGElement {
  const node = svg(width, height, 'tfos-Sparkline');
  const data = decimate(usable(points), width);
  node.setAttribute('role', 'img');
  node.setAttribute(
    'aria-label',
    data.length ? `loss over ${data.length} points` : 'no loss yet'
  );
  if (data.length) {
    const pad = { top: 2, right: 1, bottom: 2, left: 1 };
    child(node, 'path', {
      class: 'tfos-Sparkline-line',
      d: linePath(data, { width, height, pad })
    });
  }
  return node;
}

/** The detail view's loss chart: the curve, its loss range and its step range. */
export function lossChart(
  points: readonly ILossPoint[],
  label: (value: number) => string,
  width = 560,
  height = 180
): SVGSVGElement {
  const node = svg(width, height, 'tfos-LossChart');
  // Scales with the view's width, keeping the text's proportions.
  node.removeAttribute('width');
  node.removeAttribute('height');
  node.setAttribute('preserveAspectRatio', 'xMinYMin meet');
  const data = decimate(usable(points), width);
  node.setAttribute('role', 'img');
  node.setAttribute('aria-label', `loss curve, ${data.length} points`);
  if (data.length === 0) {
    return node;
  }
  const pad = { top: 10, right: 12, bottom: 22, left: 64 };
  const losses = data.map(p => p.loss);
  const [lo, hi] = [Math.min(...losses), Math.max(...losses)];
  const [first, last] = [data[0].step, data[data.length - 1].step];
  const bottom = height - pad.bottom;
  child(node, 'path', {
    class: 'tfos-LossChart-axis',
    d: `M${pad.left},${pad.top}V${bottom}H${width - pad.right}`
  });
  const text = (x: number, y: number, anchor: string, value: string): void => {
    child(node, 'text', {
      class: 'tfos-LossChart-label',
      x: String(x),
      y: String(y),
      'text-anchor': anchor
    }).textContent = value;
  };
  text(pad.left - 6, pad.top + 8, 'end', label(hi));
  text(pad.left - 6, bottom, 'end', label(lo));
  text(pad.left, height - 6, 'start', `step ${first}`);
  text(width - pad.right, height - 6, 'end', `step ${last}`);
  child(node, 'path', {
    class: 'tfos-LossChart-line',
    d: linePath(data, { width, height, pad })
  });
  return node;
}

/**
 * A job's loss curve as the front end knows it: seeded from the server's history,
 * then extended with the steps seen since (list polls, or the detail's events).
 */
export class LossSeries {
  /** Most points kept; past it every other older point goes, so memory stays flat. */
  static readonly MAX_POINTS = 1000;

  get points(): readonly ILossPoint[] {
    return this._points;
  }

  /** Replaces the curve with the server's, which is the reference. */
  seed(points: readonly ILossPoint[]): void {
    this._points = usable(points);
  }

  /** Adds a step newer than the last one known; older or repeated steps are ignored. */
  add(step: number | null, loss: number | null): boolean {
    if (step === null || loss === null || !Number.isFinite(step) || !Number.isFinite(loss)) {
      return false;
    }
    const last = this._points[this._points.length - 1];
    if (last && step <= last.step) {
      return false;
    }
    this._points.push({ step, loss });
    if (this._points.length > LossSeries.MAX_POINTS) {
      const keep = this._points.length - 1;
      this._points = this._points.filter((_, i) => i % 2 === 0 || i === keep);
    }
    return true;
  }

  private _points: ILossPoint[] = [];
}
