// A Server-Sent Events reader on fetch(): EventSource cannot send an Authorization header, and API keys
// must never go into URLs (they end up in logs). It keeps the last event id and, when the connection
// drops (the server restarts, the network fails), reconnects with back-off and resumes from that id.

const MIN_DELAY_MS = 500;
const MAX_DELAY_MS = 8000;
// The server sends a keep-alive comment every 15 s; silence for longer means a dead connection.
const SILENCE_MS = 40000;

export class Unauthorized extends Error {}

export class EventFeed {
  /**
   * @param {string} path - the feed's URL path, e.g. "/v1/alerts/stream"
   * @param {() => string} token - the API key to send
   * @param {{onEvent: (event: {id: string, type: string, data: string}) => void,
   *          onStatus: (status: "connecting"|"live"|"reconnecting"|"unauthorized") => void,
   *          lastEventId?: string}} handlers
   */
  constructor(path, token, { onEvent, onStatus, lastEventId = "" }) {
    this.path = path;
    this.token = token;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.lastEventId = lastEventId;
    this.stopped = false;
    this.controller = null;
  }

  start() {
    this.#run();
    return this;
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
  }

  async #run() {
    let delay = MIN_DELAY_MS;
    this.onStatus("connecting");
    while (!this.stopped) {
      try {
        await this.#connectOnce(() => {
          delay = MIN_DELAY_MS; // connected: the next failure starts the back-off afresh
        });
      } catch (error) {
        if (error instanceof Unauthorized) {
          this.onStatus("unauthorized");
          return;
        }
        // Anything else (refused, reset, aborted for silence, 5xx) is worth another try.
      }
      if (this.stopped) return;
      this.onStatus("reconnecting");
      await sleep(delay * (0.75 + Math.random() / 2)); // jitter: supervisors do not reconnect in step
      delay = Math.min(delay * 2, MAX_DELAY_MS);
    }
  }

  async #connectOnce(onConnected) {
    this.controller = new AbortController();
    const headers = { Authorization: `Bearer ${this.token()}`, Accept: "text/event-stream" };
    if (this.lastEventId) headers["Last-Event-ID"] = this.lastEventId;
    const response = await fetch(this.path, { headers, cache: "no-store", signal: this.controller.signal });
    if (response.status === 401 || response.status === 403) throw new Unauthorized(String(response.status));
    if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
    onConnected();
    this.onStatus("live");

    let watchdog = setTimeout(() => this.controller.abort(), SILENCE_MS);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    let event = { type: "", data: [] };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return; // the server ended the stream (shutting down): reconnect
        clearTimeout(watchdog);
        watchdog = setTimeout(() => this.controller.abort(), SILENCE_MS);
        pending += value;
        const lines = pending.split(/\r\n|\r|\n/);
        pending = lines.pop(); // an incomplete last line waits for the next chunk
        for (const line of lines) event = this.#line(line, event);
      }
    } finally {
      clearTimeout(watchdog);
    }
  }

  // One line of the SSE format (https://html.spec.whatwg.org/multipage/server-sent-events.html).
  #line(line, event) {
    if (line === "") {
      if (event.data.length) {
        this.onEvent({ id: this.lastEventId, type: event.type || "message", data: event.data.join("\n") });
      }
      return { type: "", data: [] };
    }
    if (line.startsWith(":")) return event; // a comment: the keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event.type = value;
    else if (field === "data") event.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    return event;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
