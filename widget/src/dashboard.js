// The tfos-magic dashboard: an anywidget front end (JupyterLab 4, Notebook 7, VS Code).
//
// The kernel syncs two traits: `status` (small, whole: progress, GPUs, checkpoints,
// error) and `snapshot` (every series decimated to <= 2,000 points, sent now and then and
// at the end, so that a reloaded page redraws the chart). Between snapshots, new points
// arrive as custom messages {type: "append", series: [[name, n], ...]} whose binary
// buffers hold n float64 steps then n float64 values per series: never whole series.
import uPlot from "uplot";
import uplotCss from "uplot/dist/uPlot.min.css";

const CSS = `
.tfos-dash { font: 13px/1.4 var(--jp-ui-font-family, system-ui, sans-serif); color: var(--jp-ui-font-color1, #222);
  border: 1px solid var(--jp-border-color2, #ddd); border-radius: 6px; padding: 10px 12px; max-width: 900px; }
.tfos-dash h4 { margin: 0 0 6px; font-size: 14px; display: flex; gap: 8px; align-items: center; }
.tfos-badge { font-size: 11px; padding: 1px 8px; border-radius: 9px; color: #fff; background: #777; }
.tfos-badge.running, .tfos-badge.starting { background: #1f77b4; }
.tfos-badge.succeeded { background: #2ca02c; } .tfos-badge.failed { background: #d62728; }
.tfos-badge.stopped { background: #ff7f0e; }
.tfos-phase { color: var(--jp-ui-font-color2, #555); }
.tfos-bar { height: 8px; background: var(--jp-layout-color2, #eee); border-radius: 4px; overflow: hidden; margin: 6px 0; }
.tfos-bar > div { height: 100%; background: #1f77b4; width: 0; transition: width .5s; }
.tfos-stats { display: flex; flex-wrap: wrap; gap: 4px 18px; margin-bottom: 6px; }
.tfos-stats b { font-weight: 600; }
.tfos-dash table { border-collapse: collapse; font-size: 12px; margin: 4px 0 8px; }
.tfos-dash td, .tfos-dash th { padding: 2px 8px; text-align: left; border-bottom: 1px solid var(--jp-border-color3, #eee); }
.tfos-error { color: #d62728; white-space: pre-wrap; margin: 6px 0; }
.tfos-note { color: #1f77b4; margin: 6px 0; }
.tfos-log { max-height: 180px; overflow: auto; white-space: pre; font-family: var(--jp-code-font-family, monospace); font-size: 11px; }
.tfos-section { margin-top: 6px; }
.tfos-section > summary { cursor: pointer; color: var(--jp-ui-font-color2, #555); }
`;

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

function tickLabel(v) {
  if (v == null) return "";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(0) : String(+v.toPrecision(3));
}

function fmtTime(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString();
  return Number(v).toPrecision(digits);
}

// Buffers arrive as DataViews (or ArrayBuffers) at any byte offset: copy out aligned float64s.
function float64(buf) {
  if (buf instanceof ArrayBuffer) return new Float64Array(buf.slice(0));
  return new Float64Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function render({ model, el: root }) {
  const style = el("style");
  style.textContent = uplotCss + CSS;
  const title = el("h4");
  const phase = el("div", { class: "tfos-phase" });
  const bar = el("div", { class: "tfos-bar" }, el("div"));
  const stats = el("div", { class: "tfos-stats" });
  const error = el("div", { class: "tfos-error" });
  const note = el("div", { class: "tfos-note" });
  const chartBox = el("div");
  const gpu = el("details", { class: "tfos-section", open: "" }, el("summary", {}, "Workers"), el("div"));
  const ckpts = el("details", { class: "tfos-section" }, el("summary", {}, "Checkpoints"), el("div"));
  const logs = el("details", { class: "tfos-section" }, el("summary", {}, "Worker output"), el("div", { class: "tfos-log" }));
  const box = el("div", { class: "tfos-dash" }, style, title, phase, bar, stats, note, error, chartBox, gpu, ckpts, logs);
  root.append(box);

  // Series: name -> {x: number[], y: number[]}; rebuilt from snapshots, extended by appends.
  let series = {};
  let plot = null;
  let plotNames = "";
  let pending = false;

  function loadSnapshot() {
    series = {};
    const snap = model.get("snapshot") || {};
    for (const [name, xy] of Object.entries(snap)) series[name] = { x: Array.from(xy[0]), y: Array.from(xy[1]) };
    schedule();
  }

  function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  }

  function draw() {
    const names = Object.keys(series).sort();
    if (!names.length) return;
    const data = uPlot.join(names.map((n) => [series[n].x, series[n].y]));
    const width = Math.max(300, Math.min(880, box.clientWidth - 24 || 600));
    const key = names.join("|") + (names.every((n) => series[n].y.every((v) => v > 0)) ? "|log" : "|lin");
    if (plot === null || plotNames !== key) {
      if (plot) plot.destroy();
      plotNames = key;
      plot = new uPlot({
        width, height: 220,
        // Losses span decades: a log scale once every value is positive.
        scales: { x: { time: false }, y: { distr: names.every((n) => series[n].y.every((v) => v > 0)) ? 3 : 1 } },
        // Ticks keep 3 significant digits: uPlot's default prints 1e-5 as "0".
        axes: [{ label: "step" }, { label: "loss", values: (u, ticks) => ticks.map(tickLabel) }],
        series: [{ label: "step" }, ...names.map((n, i) => ({
          label: n, stroke: n === "val_loss" ? "#d62728" : COLORS[i % COLORS.length], width: n === "val_loss" ? 2 : 1.25,
          spanGaps: true, points: { show: n === "val_loss" },
        }))],
      }, data, chartBox);
    } else {
      plot.setData(data);
    }
  }

  function renderStatus() {
    const s = model.get("status") || {};
    title.replaceChildren(`tfos job ${s.job ?? ""}`, el("span", { class: `tfos-badge ${s.state}` }, s.state ?? ""));
    if (s.attempt > 1) title.append(el("span", { class: "tfos-phase" }, `attempt ${s.attempt}`));
    phase.textContent = s.phase ?? "";
    const total = s.total_steps;
    const frac = total ? Math.min(1, s.step / total) : s.epochs ? Math.min(1, s.epoch / s.epochs) : 0;
    bar.firstChild.style.width = `${(s.state === "succeeded" ? 1 : frac) * 100}%`;
    const parts = [
      ["epoch", `${s.epoch ?? 0} / ${s.epochs ?? "?"}`],
      ["step", total ? `${s.step} / ${total}` : `${s.step ?? 0}`],
      total ? null : ["rows streamed", fmtNum(s.rows)],
      ["rows/s", fmtNum(s.rows_per_s)],
      ["elapsed", fmtTime(s.elapsed)],
      ["ETA", fmtTime(s.eta)],
    ].filter(Boolean);
    stats.replaceChildren(...parts.map(([k, v]) => el("span", {}, `${k} `, el("b", {}, v))));
    note.textContent = s.stopped_early || "";
    error.textContent = s.error ? s.error + (s.error_file ? `\n(details: ${s.error_file})` : "") : "";
    const rows = [];
    for (const [w, devices] of Object.entries(s.gpu || {})) {
      for (const d of devices) {
        rows.push(d.gpu === null || d.gpu === undefined
          ? el("tr", {}, el("td", {}, `worker ${w}`), el("td", { colspan: 4 }, `no GPU on worker ${w}: CPU ${fmtNum(d.cpu_percent, 3)}%, RSS ${fmtNum(d.rss_mb, 4)} MB`))
          : el("tr", {}, el("td", {}, `worker ${w} GPU ${d.gpu}`), el("td", {}, `${fmtNum(d.utilization, 3)}%`),
              el("td", {}, `${fmtNum(d.memory_used, 4)} / ${fmtNum(d.memory_total, 4)} MB`),
              el("td", {}, `${fmtNum(d.temperature, 3)} °C`), el("td", {}, `${fmtNum(d.power, 3)} W`)));
      }
    }
    gpu.lastChild.replaceChildren(rows.length ? el("table", {}, ...rows) : `${s.workers ?? "?"} worker(s)` + (s.ps ? `, ${s.ps} PS` : ""));
    const ck = (s.checkpoints || []).map((c) => el("tr", {}, el("td", {}, String(c.step)), el("td", {}, c.epoch ?? ""),
      el("td", {}, new Date(c.time * 1000).toLocaleTimeString()), el("td", {}, c.size ? `${fmtNum(c.size / 1e6, 3)} MB` : ""),
      el("td", {}, c.path)));
    ckpts.lastChild.replaceChildren(ck.length
      ? el("table", {}, el("tr", {}, ...["step", "epoch", "time", "size", "path"].map((h) => el("th", {}, h))), ...ck)
      : "none yet");
    const meta = [s.job_group ? `Spark job group ${s.job_group}` : "", ...(s.restarts || [])].filter(Boolean);
    ckpts.firstChild.textContent = `Checkpoints (${(s.checkpoints || []).length})` + (meta.length ? ` · ${meta.join(" · ")}` : "");
    if (s.spark_ui && !box.querySelector(".tfos-sparkui")) {
      stats.append(el("a", { class: "tfos-sparkui", href: s.spark_ui, target: "_blank" }, "Spark UI"));
    }
  }

  function onMessage(msg, buffers) {
    if (!msg || msg.type !== "append") return;
    let b = 0;
    for (const [name, n] of msg.series || []) {
      const xs = float64(buffers[b++]);
      const ys = float64(buffers[b++]);
      const s = (series[name] ??= { x: [], y: [] });
      for (let i = 0; i < n; i++) { s.x.push(xs[i]); s.y.push(ys[i]); }
    }
    const log = logs.lastChild;
    for (const line of msg.logs || []) log.append(line + "\n");
    if ((msg.logs || []).length) log.scrollTop = log.scrollHeight;
    schedule();
  }

  function loadLogs() {
    logs.lastChild.replaceChildren((model.get("log_lines") || []).join("\n") + "\n");
  }

  model.on("change:snapshot", loadSnapshot);
  model.on("change:log_lines", loadLogs);
  model.on("change:status", renderStatus);
  model.on("msg:custom", onMessage);
  loadLogs();
  loadSnapshot();
  renderStatus();
  return () => { if (plot) plot.destroy(); };
}

export default { render };
