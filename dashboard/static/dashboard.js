// The fleetlearn dashboard page: follows /api/stream (server-sent events) and draws the fleet.
//
// Rules: every string shown comes from devices or the aggregator over MQTT, so it is written
// with textContent (never innerHTML) and only into elements this script creates. The first
// event of each stream is a full snapshot: after any reconnect the page starts again from it,
// so a missed update can never leave it wrong for long. Rendering is coalesced: updates arrive
// in batches, and the tables are redrawn at most every RENDER_MS.
"use strict";

(function () {
  const RENDER_MS = 50;
  const REOPEN_MS = 5000; // after the server refused the stream outright (EventSource gives up)
  const ROUND_ROWS = 50;
  const DEVICE_ROWS = 500;
  const EVENT_ROWS = 200;
  const DASH = "\u2014";

  const state = {
    fleet: "",
    rounds: new Map(), // round id -> summary record
    devices: new Map(), // device id -> row
    events: [], // oldest first, each with a seq
    lastSeq: 0,
    counts: null,
    modelVersion: null,
    broker: null,
  };
  let plot = null;
  let renderTimer = null;

  const byId = (id) => document.getElementById(id);

  // ------------------------------------------------------------------------------ formats

  function percent(v) {
    return v == null ? DASH : (v * 100).toFixed(1) + " %";
  }
  function number(v, digits) {
    return v == null ? DASH : Number(v).toPrecision(digits);
  }
  function seconds(v) {
    return v == null ? DASH : v.toFixed(v < 10 ? 2 : 1) + " s";
  }
  function count(v) {
    return v == null ? DASH : String(v);
  }
  function bytes(v) {
    if (v == null) return DASH;
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (v >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(1)) + " " + units[i];
  }
  function joules(v) {
    if (v == null) return DASH;
    if (v >= 1e6) return (v / 1e6).toFixed(2) + " MJ";
    if (v >= 1e3) return (v / 1e3).toFixed(2) + " kJ";
    return v.toFixed(v < 10 ? 2 : 1) + " J";
  }
  function clock(ts) {
    return ts == null ? DASH : new Date(ts * 1000).toLocaleTimeString();
  }
  function yesNo(v) {
    return v == null ? DASH : v ? "yes" : "no";
  }

  // --------------------------------------------------------------------------------- DOM

  function setText(id, value) {
    byId(id).textContent = value;
  }
  function cell(row, value, field) {
    const td = document.createElement("td");
    td.textContent = value;
    if (field) td.dataset.field = field;
    row.appendChild(td);
    return td;
  }
  function fill(tableId, rows) {
    byId(tableId).tBodies[0].replaceChildren(...rows);
  }

  // ------------------------------------------------------------------------------- state

  function applySnapshot(s) {
    state.fleet = s.fleet;
    state.rounds = new Map(s.rounds.map((r) => [r.round, r]));
    state.devices = new Map(s.devices.map((d) => [d.device_id, d]));
    state.events = s.events.slice(-EVENT_ROWS);
    state.lastSeq = state.events.length ? state.events[state.events.length - 1].seq : 0;
    applyHeader(s);
    scheduleRender();
  }

  function applyUpdate(u) {
    for (const r of u.rounds) state.rounds.set(r.round, r);
    for (const d of u.devices) state.devices.set(d.device_id, d);
    for (const e of u.events) {
      if (e.seq > state.lastSeq) {
        state.events.push(e);
        state.lastSeq = e.seq;
      }
    }
    if (state.events.length > EVENT_ROWS) state.events = state.events.slice(-EVENT_ROWS);
    applyHeader(u);
    scheduleRender();
  }

  function applyHeader(h) {
    state.counts = h.counts;
    state.modelVersion = h.model_version;
    state.broker = h.broker_connected;
  }

  function ranRounds() {
    return [...state.rounds.values()]
      .filter((r) => r.state !== "refused")
      .sort((a, b) => a.round - b.round);
  }

  // ------------------------------------------------------------------------------ render

  function scheduleRender() {
    if (renderTimer === null) renderTimer = setTimeout(render, RENDER_MS);
  }

  function render() {
    renderTimer = null;
    const ran = ranRounds();
    renderHeader();
    renderTiles(ran.length ? ran[ran.length - 1] : null);
    renderChart(ran);
    renderRounds();
    renderDevices();
    renderEvents();
    renderRejected();
  }

  function renderHeader() {
    setText("fleet", state.fleet);
    const broker = byId("broker-state");
    const up = state.broker === true ? "connected" : state.broker === false ? "disconnected" : "unknown";
    broker.dataset.state = up;
    broker.textContent = "broker: " + up;
  }

  function renderTiles(latest) {
    const round = latest ? String(latest.round) : "";
    for (const id of ["last-round", "round-accuracy", "round-survivors", "round-duration"]) {
      byId(id).dataset.round = round;
    }
    setText("last-round", latest ? round : DASH);
    setText("round-state", latest ? latest.state + (latest.reason ? ": " + latest.reason : "") : "");
    setText("round-accuracy", latest ? percent(latest.accuracy) : DASH);
    setText("round-loss", latest ? "mean loss " + number(latest.mean_loss, 4) : "");
    setText(
      "round-survivors",
      latest ? count(latest.survivors) + " / " + count(latest.cohort) : DASH
    );
    setText("round-stragglers", latest ? "stragglers " + count(latest.stragglers) : "");
    setText("round-duration", latest ? seconds(latest.duration_s) : DASH);
    setText("round-mode", latest && latest.mode ? latest.mode + " mode" : "");
    setText("model-version", state.modelVersion == null ? DASH : "v" + state.modelVersion);
    const c = state.counts;
    if (c) {
      setText(
        "rounds-count",
        c.rounds.closed + " closed, " + c.rounds.aborted + " aborted, " + c.rounds.refused + " refused"
      );
      setText("devices-online", c.online + " / " + c.devices);
      setText("devices-eligible", c.eligible + " eligible, " + c.offline + " offline");
      if (c.cost) {
        setText("cost-energy", joules(c.cost.energy_j));
        setText(
          "cost-detail",
          "training CPU " + seconds(c.cost.cpu_s) + ", " + bytes(c.cost.bytes_up) + " up, " +
            bytes(c.cost.bytes_down) + " down"
        );
      }
    }
    renderPrivacy();
    renderStages(latest);
  }

  function renderPrivacy() {
    const withPrivacy = [...state.rounds.values()]
      .filter((r) => r.privacy)
      .sort((a, b) => a.round - b.round);
    const tile = byId("privacy-tile");
    if (!withPrivacy.length) {
      tile.hidden = true;
      return;
    }
    const p = withPrivacy[withPrivacy.length - 1].privacy;
    tile.hidden = false;
    setText("privacy-epsilon", number(p.epsilon, 3));
    setText(
      "privacy-budget",
      (p.epsilon_budget == null ? "no budget" : "budget " + number(p.epsilon_budget, 3)) +
        (p.delta == null ? "" : ", delta " + number(p.delta, 2))
    );
  }

  function renderStages(latest) {
    setText("stages-round", latest ? String(latest.round) : DASH);
    const rows = [];
    for (const [name, s] of Object.entries(latest ? latest.stages : {})) {
      const tr = document.createElement("tr");
      tr.dataset.stage = name;
      cell(tr, name, "stage");
      cell(tr, count(s.arrived) + " / " + count(s.expected), "arrived");
      cell(tr, count(s.dropped), "dropped");
      cell(tr, count(s.late), "late");
      cell(tr, s.closed_by || DASH, "closed_by");
      cell(tr, s.seconds == null ? DASH : s.seconds.toFixed(2), "seconds");
      rows.push(tr);
    }
    fill("stages", rows);
  }

  function renderChart(ran) {
    if (typeof uPlot === "undefined") return;
    const data = [
      ran.map((r) => r.round),
      ran.map((r) => (r.accuracy == null ? null : r.accuracy * 100)),
      ran.map((r) => r.mean_loss),
    ];
    const box = byId("chart");
    if (plot === null) {
      plot = new uPlot(
        {
          width: Math.max(300, box.clientWidth),
          height: 260,
          scales: { x: { time: false }, pct: { range: [0, 100] }, loss: {} },
          axes: [
            { label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] },
            { scale: "pct", label: "accuracy %" },
            { scale: "loss", side: 1, label: "mean loss", grid: { show: false } },
          ],
          series: [
            { label: "round" },
            {
              label: "accuracy",
              scale: "pct",
              stroke: "#1f6feb",
              width: 2,
              value: (u, v) => (v == null ? DASH : v.toFixed(1) + " %"),
            },
            {
              label: "mean loss",
              scale: "loss",
              stroke: "#cf222e",
              width: 2,
              value: (u, v) => (v == null ? DASH : v.toPrecision(4)),
            },
          ],
        },
        data,
        box
      );
    } else {
      plot.setData(data);
    }
  }

  function renderRounds() {
    const rows = [...state.rounds.values()]
      .sort((a, b) => b.round - a.round)
      .slice(0, ROUND_ROWS)
      .map((r) => {
        const tr = document.createElement("tr");
        tr.dataset.round = String(r.round);
        tr.dataset.state = r.state;
        cell(tr, String(r.round), "round");
        cell(tr, r.state, "state").title = r.reason || "";
        cell(tr, r.mode || DASH, "mode");
        cell(tr, percent(r.accuracy), "accuracy");
        cell(tr, number(r.mean_loss, 4), "mean_loss");
        cell(tr, count(r.survivors) + " / " + count(r.cohort), "survivors");
        cell(tr, count(r.stragglers), "stragglers");
        cell(tr, count(r.dropouts_recovered), "dropouts_recovered");
        cell(tr, seconds(r.duration_s), "duration_s");
        cell(tr, bytes(r.uplink_bytes_per_device), "uplink");
        cell(tr, bytes(r.downlink_bytes_per_device), "downlink");
        // The sums of the devices' cost reports (secure rounds: the aggregator sees only these).
        const cost = r.cost || {};
        cell(tr, seconds(cost.cpu_s), "cost_cpu_s").title =
          cost.devices == null ? "" : cost.devices + " devices reported";
        cell(tr, joules(cost.energy_j), "cost_energy_j");
        return tr;
      });
    fill("rounds", rows);
  }

  function renderDevices() {
    const ids = [...state.devices.keys()].sort();
    const total = state.counts ? Math.max(state.counts.devices, ids.length) : ids.length;
    setText("devices-count", "(" + total + ")");
    setText(
      "devices-note",
      ids.length > DEVICE_ROWS || total > ids.length
        ? "showing the first " + Math.min(DEVICE_ROWS, ids.length) + " of " + total + " devices by id"
        : ""
    );
    const rows = ids.slice(0, DEVICE_ROWS).map((id) => {
      const d = state.devices.get(id);
      const h = d.health || {};
      const tr = document.createElement("tr");
      tr.dataset.device = id;
      tr.dataset.online = String(d.online);
      cell(tr, id, "device_id");
      cell(tr, d.online == null ? DASH : d.online ? "online" : "offline", "online");
      cell(tr, d.eligibility || DASH, "eligibility").title = d.note || "";
      cell(tr, d.battery == null ? DASH : Math.round(d.battery * 100) + " %", "battery");
      cell(tr, yesNo(d.charging), "charging");
      cell(tr, d.model_version == null ? DASH : "v" + d.model_version, "model_version");
      cell(tr, percent(h.accuracy), "accuracy");
      cell(tr, percent(h.anomalous_share), "anomalous_share");
      cell(tr, number(h.score, 4), "score");
      cell(tr, clock(d.last_seen), "last_seen");
      return tr;
    });
    fill("devices", rows);
  }

  function describe(e) {
    const skip = new Set(["event", "round", "ts", "seq", "received"]);
    const parts = [];
    if (e.round != null) parts.push("round " + e.round);
    for (const [k, v] of Object.entries(e)) {
      if (skip.has(k) || v == null || v === "" || (Array.isArray(v) && !v.length)) continue;
      parts.push(k + "=" + (Array.isArray(v) ? v.join(",") : String(v)));
    }
    return parts.join(" ");
  }

  function renderEvents() {
    const items = state.events
      .slice()
      .reverse()
      .map((e) => {
        const li = document.createElement("li");
        li.dataset.seq = String(e.seq);
        const when = document.createElement("span");
        when.className = "when";
        when.textContent = clock(e.ts == null ? e.received : e.ts);
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = e.event;
        const rest = document.createElement("span");
        rest.textContent = describe(e);
        li.append(when, name, rest);
        return li;
      });
    byId("events").replaceChildren(...items);
  }

  function renderRejected() {
    const rejected = state.counts ? state.counts.rejected : {};
    const rows = Object.entries(rejected)
      .filter(([, n]) => n > 0)
      .map(([reason, n]) => {
        const tr = document.createElement("tr");
        tr.dataset.reason = reason;
        cell(tr, reason, "reason");
        cell(tr, String(n), "count");
        return tr;
      });
    fill("rejected", rows);
    setText("rejected-note", rows.length ? "" : "none");
  }

  // ------------------------------------------------------------------------------ stream

  function setStream(s) {
    const el = byId("stream-state");
    el.dataset.state = s;
    el.textContent = s === "open" ? "live" : s;
  }

  function connect() {
    const source = new EventSource("/api/stream");
    source.addEventListener("snapshot", (e) => {
      setStream("open");
      applySnapshot(JSON.parse(e.data));
    });
    source.addEventListener("update", (e) => applyUpdate(JSON.parse(e.data)));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        setStream("closed");
        setTimeout(connect, REOPEN_MS);
      } else {
        setStream("reconnecting");
      }
    });
  }

  window.addEventListener("resize", () => {
    if (plot !== null) plot.setSize({ width: Math.max(300, byId("chart").clientWidth), height: 260 });
  });

  connect();
})();
