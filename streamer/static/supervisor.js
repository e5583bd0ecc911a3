// The supervisor page: sign in with a monitor key, then live calls and alerts from the server's SSE
// feeds, acknowledgements, and a site filter. Everything is scoped to the key's tenant by the server.

import { CallList, byAttention, clock } from "./calls.js";
import { EventFeed } from "./sse.js";

const KEY_STORAGE = "vpmon.supervisor.key"; // sessionStorage: gone when the tab closes
const TREND_POINTS = 40; // scores kept per call for its sparkline
// On sign-in the calls feed replays this much history, so sparklines start with a trend.
const TREND_REPLAY_MS = 120_000;
const ALERTS_LOADED = 200;
const ALERTS_SHOWN = 200;

const $ = (id) => document.getElementById(id);

const page = {
  key: "",
  calls: new Map(), // call id → call state, with .trend (recent scores)
  alerts: new Map(), // event id → {id, type, data, acknowledged}
  sites: new Set(),
  site: "",
  feeds: [],
  status: { calls: "connecting", alerts: "connecting" },
  // Calls feed events older than the GET /v1/calls snapshot only extend trends: the snapshot is newer.
  snapshotAt: 0,
  renderQueued: false,
  alertsChanged: true, // the alert list is redrawn only then: a redraw under the pointer eats clicks
};

let callList;

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, { method = "GET", key = page.key } = {}) {
  const response = await fetch(path, { method, headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    throw new ApiError(response.status, problem.detail ?? `HTTP ${response.status}`);
  }
  return response;
}

// --- signing in and out -------------------------------------------------------------------------
async function signIn(key) {
  const health = await (await api("/healthz", { key })).json();
  const callsResponse = await api("/v1/calls", { key }); // 403 unless the key may monitor
  page.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("who").textContent = `tenant ${health.tenant} · key ${keyId(key)}`;
  $("sign-in").hidden = true;
  $("session").hidden = false;
  $("board").hidden = false;
  await start(callsResponse);
}

function signOut(message = "") {
  for (const feed of page.feeds) feed.stop();
  page.feeds = [];
  page.key = "";
  page.calls.clear();
  page.alerts.clear();
  page.sites.clear();
  page.site = "";
  page.alertsChanged = true;
  page.status = { calls: "connecting", alerts: "connecting" };
  $("site-filter").replaceChildren(new Option("All sites", "")); // nothing of this tenant stays
  $("alert-list").replaceChildren();
  $("call-rows").replaceChildren();
  sessionStorage.removeItem(KEY_STORAGE);
  $("board").hidden = true;
  $("session").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("api-key").value = "";
}

function keyId(key) {
  return key.split("_")[1] ?? "?"; // vpk_<key id>_<secret>: the id is public, the secret is not shown
}

// --- loading and following ----------------------------------------------------------------------
async function start(callsResponse) {
  // The server's clock, for the stream ids (milliseconds since the epoch) of the calls feed.
  page.snapshotAt = Date.parse(callsResponse.headers.get("date") ?? "") || Date.now();
  for (const call of await callsResponse.json()) {
    page.calls.set(call.call_id, { ...call, trend: [] }); // the replayed verdicts fill the trend
    page.sites.add(call.site ?? "");
  }
  const alerts = await (await api(`/v1/alerts?limit=${ALERTS_LOADED}`)).json();
  for (const alert of alerts) addAlert(alert.id, alert.type, alert.data, alert.acknowledged);
  const newestAlert = alerts.length ? alerts[0].id : "0-0";

  const token = () => page.key;
  page.feeds = [
    new EventFeed("/v1/calls/stream", token, {
      lastEventId: `${page.snapshotAt - TREND_REPLAY_MS}-0`,
      onEvent: onCallEvent,
      onStatus: (status) => setStatus("calls", status),
    }).start(),
    new EventFeed("/v1/alerts/stream", token, {
      lastEventId: newestAlert,
      onEvent: onAlertEvent,
      onStatus: (status) => setStatus("alerts", status),
    }).start(),
  ];
  queueRender();
}

function onCallEvent({ id, type, data }) {
  const event = JSON.parse(data);
  const fresh = Number(id.split("-")[0]) >= page.snapshotAt;
  let call = page.calls.get(event.call_id);
  const known = call !== undefined;
  if (!known) {
    const seenAt = new Date(Number(id.split("-")[0])).toISOString();
    call = { call_id: event.call_id, started_at: seenAt, alerts: 0, trend: [] };
    page.calls.set(event.call_id, call);
  }
  if (type === "verdict" && event.score != null) {
    call.trend.push(event.score);
    if (call.trend.length > TREND_POINTS) call.trend.shift();
  }
  // A verdict never brings an ended call back (a late event from before the end).
  const revives = type === "verdict" && call.state === "ended";
  if ((fresh || !known) && !revives) {
    for (const field of ["agent_id", "site", "protocol", "model_id", "state", "score", "threshold",
      "net_speech_seconds", "started_at", "alerts", "ended_reason"]) {
      if (event[field] !== undefined) call[field] = event[field];
    }
  }
  page.sites.add(call.site ?? "");
  queueRender();
}

function onAlertEvent({ id, type, data }) {
  const event = JSON.parse(data);
  if (type === "ack") {
    const alert = page.alerts.get(event.event_id);
    if (alert && !alert.acknowledged) {
      alert.acknowledged = event;
      page.alertsChanged = true;
    }
  } else {
    addAlert(id, type, event, null);
  }
  queueRender();
}

function addAlert(id, type, data, acknowledged) {
  if (page.alerts.has(id)) return; // replayed after a reconnect
  page.alerts.set(id, { id, type, data, acknowledged });
  page.alertsChanged = true;
  page.sites.add(data.site ?? "");
}

async function acknowledge(id, button) {
  button.disabled = true;
  try {
    const ack = await (await api(`/v1/alerts/${encodeURIComponent(id)}/ack`, { method: "POST" })).json();
    page.alerts.get(id).acknowledged = ack;
    page.alertsChanged = true;
    queueRender();
  } catch (error) {
    button.disabled = false;
    button.title = error.message;
  }
}

function setStatus(feed, status) {
  if (status === "unauthorized") {
    signOut("The key was revoked or may not monitor: sign in again.");
    return;
  }
  page.status[feed] = status;
  const statuses = Object.values(page.status);
  const overall = statuses.every((s) => s === "live") ? "live" : statuses.includes("reconnecting") ? "reconnecting" : "connecting";
  const element = $("feed-status");
  element.dataset.status = overall;
  element.textContent = overall === "reconnecting" ? "reconnecting…" : overall;
}

// --- rendering ----------------------------------------------------------------------------------
// Events can come hundreds a second: draw at most once a frame.
function queueRender() {
  if (page.renderQueued) return;
  page.renderQueued = true;
  requestAnimationFrame(() => {
    page.renderQueued = false;
    render();
  });
}

function render() {
  const inSite = (site) => page.site === "" || (site ?? "") === page.site;
  renderSites();
  const calls = [...page.calls.values()].filter((call) => inSite(call.site)).sort(byAttention);
  const live = calls.filter((call) => call.state !== "ended").length;
  $("call-count").textContent = `${live} live · ${calls.length - live} ended`;
  $("no-calls").hidden = calls.length > 0;
  const open = [...page.alerts.values()].filter((alert) => !alert.acknowledged);
  callList.show(calls, new Set(open.filter((alert) => alert.type === "alert").map((alert) => alert.data.call_id)));

  if (!page.alertsChanged) return;
  page.alertsChanged = false;
  const alerts = [...page.alerts.values()].filter((alert) => inSite(alert.data.site));
  alerts.sort((a, b) => compareIds(b.id, a.id));
  $("alert-count").textContent = `${alerts.filter((alert) => !alert.acknowledged).length} open`;
  $("no-alerts").hidden = alerts.length > 0;
  $("alert-list").replaceChildren(...alerts.slice(0, ALERTS_SHOWN).map(alertItem));
}

function renderSites() {
  const select = $("site-filter");
  const known = [...select.options].map((option) => option.value);
  for (const site of [...page.sites].filter((s) => s !== "").sort()) {
    if (!known.includes(site)) select.add(new Option(site, site));
  }
}

function alertItem(alert) {
  const { data } = alert;
  const item = document.createElement("li");
  item.className = `alert ${alert.type}`;
  item.dataset.eventId = alert.id;
  item.dataset.callId = data.call_id ?? "";
  if (alert.acknowledged) item.classList.add("acknowledged");

  const title = document.createElement("strong");
  title.textContent = alert.type === "alert" ? `Voice mismatch: ${data.agent_id ?? "unknown agent"}` : data.message ?? data.kind;
  const facts = document.createElement("span");
  facts.className = "facts";
  const parts = [`call ${data.call_id}`, data.site ? `site ${data.site}` : null];
  if (data.score != null) parts.push(`score ${data.score.toFixed(2)} (verified at ${data.threshold.toFixed(2)})`);
  // The alert itself is raised by the impostor evidence (a CUSUM of window LLRs, verifier/decision.py).
  if (data.impostor_evidence != null) parts.push(`impostor evidence ${data.impostor_evidence.toFixed(1)}`);
  if (data.net_speech_seconds != null) parts.push(`${data.net_speech_seconds.toFixed(1)} s of speech`);
  if (data.impostor_since != null) parts.push(`since ${data.impostor_since.toFixed(0)} s into the call`);
  parts.push(clock(Number(alert.id.split("-")[0])));
  facts.textContent = parts.filter(Boolean).join(" · ");
  item.append(title, facts);

  if (alert.acknowledged) {
    const who = alert.acknowledged.acknowledged_by;
    const done = document.createElement("span");
    done.className = "ack";
    done.textContent = `Acknowledged by ${who.name || who.key_id} at ${clock(alert.acknowledged.acknowledged_at)}`;
    item.append(done);
  } else {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Acknowledge";
    button.addEventListener("click", () => acknowledge(alert.id, button));
    item.append(button);
  }
  return item;
}

function compareIds(a, b) {
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am - bm || as - bs;
}

// --- wiring -------------------------------------------------------------------------------------
function main() {
  callList = new CallList($("call-viewport"), $("call-spacer"), $("call-rows"));
  $("sign-in").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("sign-in-error").textContent = "";
    try {
      await signIn(key);
    } catch (error) {
      signOut(signInError(error));
    }
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("site-filter").addEventListener("change", (event) => {
    page.site = event.target.value;
    page.alertsChanged = true;
    $("call-viewport").scrollTop = 0;
    queueRender();
  });
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) resume(saved);
}

// A reload while the server is away (restarting): keep the key and try again, unless it is refused.
async function resume(key) {
  for (let delay = 1000; ; delay = Math.min(2 * delay, 8000)) {
    try {
      await signIn(key);
      return;
    } catch (error) {
      if (error instanceof ApiError && error.status < 500) {
        signOut(signInError(error));
        return;
      }
      $("sign-in-error").textContent = `${signInError(error)} Retrying…`;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

function signInError(error) {
  if (error instanceof ApiError && error.status === 401) return "Unknown, malformed or revoked key.";
  if (error instanceof ApiError && error.status === 403) return `This key may not monitor calls: ${error.message}`;
  return `The server did not answer (${error.message}); try again.`;
}

main();
