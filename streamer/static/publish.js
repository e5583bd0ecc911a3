// Publish this browser's microphone as a live call: WHIP (RFC 9725) to POST /v1/whip, no trickle ICE
// (the offer goes out with every candidate), verdicts back on a data channel.

const $ = (id) => document.getElementById(id);
let session = null; // {pc, stream, location, key}

function setState(state, error = "") {
  $("publish-status").dataset.state = state;
  $("publish-status").textContent = state;
  $("publish-error").textContent = error;
  $("start").disabled = state === "connecting" || state === "publishing";
  $("stop").disabled = session === null;
}

async function start() {
  const key = $("api-key").value.trim();
  setState("connecting");
  // Raw audio: the voice, not what the browser's call processing makes of it.
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    video: false,
  });
  const pc = new RTCPeerConnection();
  session = { pc, stream, location: null, key };
  for (const track of stream.getAudioTracks()) pc.addTransceiver(track, { direction: "sendonly" });
  const channel = pc.createDataChannel("vpmon");
  channel.addEventListener("message", (event) => showVerdict(JSON.parse(event.data)));
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "connected") setState("publishing");
    if (pc.connectionState === "failed") setState("failed", "the media connection failed (ICE)");
  });

  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringComplete(pc);
  const headers = { Authorization: `Bearer ${key}`, "Content-Type": "application/sdp" };
  if ($("call-id").value.trim()) headers["Vpmon-Call-Id"] = $("call-id").value.trim();
  if ($("agent-id").value.trim()) headers["Vpmon-Agent-Id"] = $("agent-id").value.trim();
  const response = await fetch("/v1/whip", { method: "POST", headers, body: pc.localDescription.sdp });
  if (response.status !== 201) {
    const problem = await response.json().catch(() => ({}));
    throw new Error(problem.detail ?? `HTTP ${response.status}`);
  }
  session.location = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
}

function iceGatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") resolve();
    });
  });
}

function showVerdict(message) {
  if (message.type !== "verdict") return;
  $("verdicts").textContent = String(Number($("verdicts").textContent) + 1);
  $("latest").textContent = message.score == null ? message.state : `${message.state} (score ${message.score.toFixed(2)})`;
}

async function stop() {
  const current = session;
  session = null;
  if (!current) return;
  if (current.location) {
    // Ends the call on the server: its last verdicts are published before the answer.
    await fetch(current.location, { method: "DELETE", headers: { Authorization: `Bearer ${current.key}` } }).catch(() => {});
  }
  current.pc.close();
  for (const track of current.stream.getTracks()) track.stop();
  setState("stopped");
}

$("publish").addEventListener("submit", (event) => {
  event.preventDefault();
  start().catch(async (error) => {
    await stop();
    setState("failed", error.message);
  });
});
$("stop").addEventListener("click", () => stop());
