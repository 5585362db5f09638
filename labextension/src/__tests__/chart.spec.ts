/** The curves' geometry: decimation, paths, and the series the views keep. */

import { LossSeries, decimate, linePath, sparkline } from '../chart';
import { formatCount, formatLoss, formatWhen, progress } from '../format';

const box = { width: 100, height: 20, pad: { top: 0, right: 0, bottom: 0, left: 0 } };

describe('decimate', () => {
  it('keeps the ends and each bucket’s extremes, in step order', () => {
    const points = Array.from({ length: 1000 }, (_, i) => ({ step: i, loss: 1 }));
    points[500].loss = 9; // a spike that plain sampling would likely drop
    points[700].loss = -3;

    const kept = decimate(points, 50);

    expect(kept.length).toBeLessThanOrEqual(50);
    expect(kept[0]).toBe(points[0]);
    expect(kept[kept.length - 1]).toBe(points[999]);
    expect(kept).toContain(points[500]);
    expect(kept).toContain(points[700]);
    expect(kept.map(p => p.step)).toEqual([...kept.map(p => p.step)].sort((a, b) => a - b));
  });
});

describe('linePath', () => {
  it('scales steps across and losses up the box, lowest loss at the bottom', () => {
    const d = linePath([{ step: 0, loss: 2 }, { step: 10, loss: 1 }], box);
    expect(d).toBe('M0.0,0.0L100.0,20.0');
  });

  it('draws one point or a flat loss as a level line, never NaN', () => {
    expect(linePath([{ step: 5, loss: 1 }], box)).toBe('M48.0,10.0H52.0');
    expect(linePath([{ step: 0, loss: 1 }, { step: 1, loss: 1 }], box)).toBe('M0.0,10.0L100.0,10.0');
  });

  it('leaves out points without a finite loss', () => {
    const svg = sparkline([{ step: 0, loss: NaN }, { step: 1, loss: 2 }, { step: 2, loss: 1 }]);
    expect(svg.querySelector('path')!.getAttribute('d')!.split('L')).toHaveLength(2);
    expect(sparkline([]).querySelector('path')).toBeNull();
  });
});

describe('LossSeries', () => {
  it('adds only newer steps, and stays bounded', () => {
    const series = new LossSeries();
    series.seed([{ step: 10, loss: 1 }]);
    expect(series.add(10, 0.5)).toBe(false);
    expect(series.add(5, 0.5)).toBe(false);
    expect(series.add(null, 0.5)).toBe(false);
    expect(series.add(11, 0.9)).toBe(true);
    for (let step = 12; step < 12 + 2 * LossSeries.MAX_POINTS; step++) {
      series.add(step, 1 / step);
    }
    expect(series.points.length).toBeLessThanOrEqual(LossSeries.MAX_POINTS);
    expect(series.points[series.points.length - 1].step).toBe(11 + 2 * LossSeries.MAX_POINTS);
  });
});

describe('format', () => {
  it('words losses, counts and progress for a narrow row', () => {
    expect(formatLoss(0.812345)).toBe('0.8123');
    expect(formatLoss(0.00001234)).toBe('1.23e-5');
    expect(formatLoss(null)).toBe('–');
    expect(formatCount(950)).toBe('950');
    expect(formatCount(1234)).toBe('1.2k');
    expect(formatCount(4_500_000)).toBe('4.5M');
    const job = { state: 'running', epoch: 0, epochs: 0, step: null } as const;
    expect(progress(job as never)).toEqual({ fraction: 0, label: 'no step yet' });
  });

  it('reads a time slightly ahead of the browser clock as now, not as the future', () => {
    const ahead = formatWhen(Date.now() / 1000 + 30).human;
    expect(ahead).toBe(formatWhen(Date.now() / 1000).human);
    expect(formatWhen(null).human).toBe('–');
  });
});
