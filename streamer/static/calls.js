// The call list: a virtualised table (only the rows in view are in the DOM, so hundreds of live calls
// stay cheap) with a score sparkline per call.

const ROW_HEIGHT = 40; // px; must match .call-row in supervisor.css
const OVERSCAN = 6; // rows rendered above and below the visible ones, so fast scrolling shows no gaps
const SVG = "http://www.w3.org/2000/svg";
const SPARK_WIDTH = 120;
const SPARK_HEIGHT = 26;

// Calls that need a supervisor first; ended calls last.
const ATTENTION = { mismatch: 0, suspect: 1, not_enrolled: 2, model_mismatch: 2, ended: 4 };

export function byAttention(a, b) {
  const rank = (call) => ATTENTION[call.state] ?? 3;
  return rank(a) - rank(b) || b.started_at.localeCompare(a.started_at) || a.call_id.localeCompare(b.call_id);
}

export class CallList {
  constructor(viewport, spacer, rows) {
    this.viewport = viewport;
    this.spacer = spacer;
    this.rows = rows;
    this.calls = [];
    this.alerted = new Set();
    viewport.addEventListener("scroll", () => this.render(), { passive: true });
    new ResizeObserver(() => this.render()).observe(viewport);
  }

  /** @param alerted - ids of the calls with an alert nobody has acknowledged yet */
  show(calls, alerted) {
    this.calls = calls;
    this.alerted = alerted;
    this.spacer.style.height = `${calls.length * ROW_HEIGHT}px`;
    this.render();
  }

  render() {
    const top = this.viewport.scrollTop;
    const height = this.viewport.clientHeight;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(this.calls.length, Math.ceil((top + height) / ROW_HEIGHT) + OVERSCAN);
    this.rows.style.transform = `translateY(${first * ROW_HEIGHT}px)`;
    const rows = this.calls.slice(first, last).map((call) => row(call, this.alerted.has(call.call_id)));
    this.rows.replaceChildren(...rows);
  }
}

function row(call, alerted) {
  const element = document.createElement("div");
  element.className = "call-grid call-row";
  element.setAttribute("role", "row");
  element.dataset.callId = call.call_id;
  element.dataset.state = call.state;
  element.append(
    cell("agent", call.agent_id ?? "unknown agent", call.call_id),
    cell("site", call.site ?? "—"),
    badge(call.state),
    sparkline(call.trend.length || call.score == null ? call.trend : [call.score], call.threshold),
    cell("speech", call.net_speech_seconds == null ? "—" : `${call.net_speech_seconds.toFixed(1)} s`),
    cell("model", call.model_id ?? "—"),
    cell("started", clock(call.started_at)),
  );
  if (alerted) element.classList.add("alerted");
  return element;
}

function cell(kind, text, detail) {
  const element = document.createElement("span");
  element.className = kind;
  element.setAttribute("role", "cell");
  element.textContent = text;
  if (detail) {
    const small = document.createElement("small");
    small.textContent = detail;
    element.append(small);
  }
  return element;
}

function badge(state) {
  const element = cell("state", state.replace("_", " "));
  element.dataset.state = state;
  return element;
}

// Recent scores as a line on a fixed 0–1 cosine axis (so lines of different calls compare), and the
// current threshold as a dashed line: below it, the voice does not match.
function sparkline(scores, threshold) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "trend");
  svg.setAttribute("role", "cell");
  svg.setAttribute("viewBox", `0 0 ${SPARK_WIDTH} ${SPARK_HEIGHT}`);
  svg.setAttribute("width", SPARK_WIDTH);
  svg.setAttribute("height", SPARK_HEIGHT);
  const y = (score) => (SPARK_HEIGHT - 2) * (1 - Math.min(1, Math.max(0, score))) + 1;
  if (threshold != null) {
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("class", "threshold");
    line.setAttribute("x1", 0);
    line.setAttribute("x2", SPARK_WIDTH);
    line.setAttribute("y1", y(threshold));
    line.setAttribute("y2", y(threshold));
    svg.append(line);
  }
  if (scores.length) {
    const step = scores.length > 1 ? SPARK_WIDTH / (scores.length - 1) : 0;
    const points = scores.map((score, i) => `${(i * step).toFixed(1)},${y(score).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", scores.length > 1 ? points.join(" ") : `0,${y(scores[0])} ${SPARK_WIDTH},${y(scores[0])}`);
    svg.append(line);
    svg.setAttribute("aria-label", `latest score ${scores.at(-1).toFixed(2)}`);
  }
  return svg;
}

export function clock(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "—" : date.toLocaleTimeString([], { hour12: false });
}
