/** Small DOM builders shared by the list and the detail view. */

import { IJobSummary } from './api';
import { progress, stateClass } from './format';

/** An element with a class and text, or children. */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  cls = '',
  ...content: Array<Node | string | null>
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (cls) {
    node.className = cls;
  }
  for (const part of content) {
    if (part !== null) {
      node.append(part);
    }
  }
  return node;
}

/** The state as a coloured badge: the colour says it at a glance, the text says it exactly. */
export function stateBadge(state: string): HTMLSpanElement {
  return el('span', `tfos-StateBadge ${stateClass(state)}`, state);
}

/** The epoch progress bar with its label (epochs done, and the step). */
export function progressBar(job: IJobSummary): HTMLDivElement {
  const { fraction, label } = progress(job);
  const bar = el('div', 'tfos-Progress-fill');
  bar.style.width = `${(fraction * 100).toFixed(1)}%`;
  const track = el('div', `tfos-Progress-track ${stateClass(job.state)}`, bar);
  track.setAttribute('role', 'progressbar');
  track.setAttribute('aria-valuemin', '0');
  track.setAttribute('aria-valuemax', '100');
  track.setAttribute('aria-valuenow', String(Math.round(fraction * 100)));
  track.setAttribute('aria-label', label);
  return el('div', 'tfos-Progress', track, el('span', 'tfos-Progress-label', label));
}
