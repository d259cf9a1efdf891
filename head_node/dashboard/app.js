/* dcf dashboard: live view of the head over Server-Sent Events (/v1/stream). No external requests. */
(() => {
  "use strict";

  const COLORS = ["#4ea1ff", "#3fb950", "#d29922", "#bc8cff", "#f778ba", "#39c5cf", "#ff7b72", "#a5d6ff",
    "#7ee787", "#ffa657"];
  const MAX_SAMPLES = 3600;
  const MAX_EVENTS = 80;
  const MAX_ALERTS = 50;
  const CONNECTED = new Set(["ready", "busy", "draining"]);
  const $ = (id) => document.getElementById(id);

  // ---- token: ?token=... once, then kept in local storage ----------------------------------------
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    localStorage.setItem("dcf.token", params.get("token"));
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  let token = localStorage.getItem("dcf.token") || "";

  function api(path, opts = {}) {
    const headers = Object.assign({}, opts.headers || {});
    if (token) headers.Authorization = "Bearer " + token;
    return fetch(path, Object.assign({}, opts, { headers }));
  }

  // ---- state -------------------------------------------------------------------------------------
  const state = {
    snapshot: null,
    nodes: [],
    jobs: new Map(),
    series: { n: [], t: [], total: [], providers: {} },
    shares: [],
    training: {},
    alerts: [],
    events: [],
    colors: {},
    trainJob: null,
    trainPinned: false,
  };

  function colorOf(pid) {
    if (!(pid in state.colors)) state.colors[pid] = COLORS[Object.keys(state.colors).length % COLORS.length];
    return state.colors[pid];
  }

  // ---- formatting --------------------------------------------------------------------------------
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const pad = (n) => String(n).padStart(2, "0");
  function clock(ts) {
    const d = new Date(ts * 1000);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function num(v, digits = 1) {
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(digits) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(digits) + "k";
    if (a >= 100) return v.toFixed(0);
    return v.toFixed(digits);
  }
  function bytes(n) {
    if (!n) return "0 B";
    const u = ["B", "KB", "MB", "GB", "TB"];
    const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1000)));
    return (n / Math.pow(1000, i)).toFixed(i ? 1 : 0) + " " + u[i];
  }
  function dur(s) {
    if (s == null || !isFinite(s)) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + "m " + pad(Math.floor(s % 60)) + "s";
    return Math.floor(s / 3600) + "h " + pad(Math.floor((s % 3600) / 60)) + "m";
  }

  // ---- connection --------------------------------------------------------------------------------
  let source = null;
  let retryTimer = null;

  function setConn(kind, text) {
    $("conn").dataset.state = kind;
    $("conn-text").textContent = text;
  }

  function connect() {
    clearTimeout(retryTimer);
    if (source) source.close();
    setConn("connecting", "connecting…");
    source = new EventSource("/v1/stream" + (token ? "?token=" + encodeURIComponent(token) : ""));
    source.addEventListener("snapshot", (m) => {
      setConn("live", "live");
      $("token-form").hidden = true;
      onSnapshot(JSON.parse(m.data));
    });
    source.addEventListener("event", (m) => onEvent(JSON.parse(m.data)));
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        checkAuth();
      } else {
        setConn("error", "reconnecting…");
      }
    };
  }

  async function checkAuth() {
    try {
      const r = await api("/v1/nodes");
      if (r.status === 401) {
        setConn("auth", "token needed");
        $("token-form").hidden = false;
        $("token-error").textContent = token ? "that token was refused" : "";
        return;
      }
    } catch (e) { /* head unreachable: retry below */ }
    setConn("error", "head unreachable, retrying…");
    retryTimer = setTimeout(connect, 2000);
  }

  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token-input").value.trim();
    localStorage.setItem("dcf.token", token);
    connect();
  });

  // downloads that need the token go through fetch
  for (const id of ["link-metrics", "link-csv"]) {
    $(id).addEventListener("click", async (e) => {
      if (!token) return;
      e.preventDefault();
      const a = e.currentTarget;
      const r = await api(a.getAttribute("href"));
      const url = URL.createObjectURL(await r.blob());
      window.open(url, "_blank");
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    });
  }

  // ---- messages ----------------------------------------------------------------------------------
  function onSnapshot(msg) {
    const snap = msg.snapshot;
    const obs = msg.observe;
    if (msg.full) {
      state.series = { n: [], t: [], total: [], providers: {} };
      state.training = {};
      state.alerts = [];
    }
    state.snapshot = snap;
    state.nodes = snap.nodes || [];
    const jobs = new Map();
    for (const j of msg.recent_jobs || []) jobs.set(j.job_id, j);
    for (const j of snap.jobs || []) jobs.set(j.job_id, j);
    state.jobs = jobs;
    mergeSeries(obs.series);
    state.shares = obs.shares || [];
    for (const [job, points] of Object.entries(obs.training || {})) {
      const have = state.training[job] || (state.training[job] = []);
      for (const p of points) {
        const last = have[have.length - 1];
        if (last && p.step != null && last.step === p.step) have[have.length - 1] = p;  // merged on the head
        else have.push(p);
      }
      if (!state.trainPinned) state.trainJob = job;
    }
    for (const a of obs.alerts || []) state.alerts.unshift(a);
    state.alerts.length = Math.min(state.alerts.length, MAX_ALERTS);
    if (msg.full && msg.recent_events) {
      state.events = [];
      for (const ev of msg.recent_events) addEvent(ev);
      renderEvents();
    }
    render();
  }

  // the event log, newest first by seq (the head's order), each event once: an event can come
  // both in a full snapshot's recent_events and on its own
  function addEvent(ev) {
    const list = state.events;
    let i = 0;
    while (i < list.length && list[i].seq > ev.seq) i++;
    if (i < list.length && list[i].seq === ev.seq) return false;
    list.splice(i, 0, ev);
    list.length = Math.min(list.length, MAX_EVENTS);
    return true;
  }

  function onEvent(ev) {
    if (!addEvent(ev)) return;
    const job = ev.job_id ? state.jobs.get(ev.job_id) : null;
    if (job) {
      // job.started, job.progress and the end events carry the job's progress as the head counts it
      // (done, total, unit): the one number `dcf status` and `dcf jobs` show too
      if (typeof ev.done === "number" && typeof ev.total === "number") {
        job.progress = { done: ev.done, total: ev.total, unit: ev.unit };
      }
      if (ev.kind === "job.progress" || ev.kind === "job.started") {
        job.state = "running";
      } else if (ev.kind === "job.done" || ev.kind === "job.failed" || ev.kind === "job.cancelled") {
        job.state = ev.kind.slice(4);
        job.finished_at = ev.ts;
        if (ev.error) job.error = ev.error;
      }
    }
    scheduleRender(ev.kind.startsWith("job.") && ev.kind !== "job.metrics");
    renderEvents();
  }

  // a delta holds new samples and earlier ones the head amended (work spread back over the time
  // it was computed): a sample the page has is replaced, by its number n
  function mergeSeries(delta) {
    if (!delta || !delta.t) return;
    const S = state.series;
    for (const [pid, p] of Object.entries(delta.providers || {})) {
      if (!S.providers[pid]) S.providers[pid] = { name: p.name, values: new Array(S.t.length).fill(null) };
      S.providers[pid].name = p.name;
    }
    delta.t.forEach((t, i) => {
      const n = delta.n ? delta.n[i] : null;
      let at = n != null && S.n.length ? n - S.n[0] : -1;
      if (at < 0 || at >= S.n.length || S.n[at] !== n) at = n == null ? -1 : S.n.lastIndexOf(n);
      if (at < 0) {
        at = S.t.length;
        S.n.push(n);
        S.t.push(t);
        S.total.push(null);
        for (const col of Object.values(S.providers)) col.values.push(null);
      }
      S.total[at] = delta.throughput_gflops[i];
      for (const [pid, p] of Object.entries(delta.providers || {})) S.providers[pid].values[at] = p.gflops[i];
    });
    const extra = S.t.length - MAX_SAMPLES;
    if (extra > 0) {
      S.n.splice(0, extra);
      S.t.splice(0, extra);
      S.total.splice(0, extra);
      for (const col of Object.values(S.providers)) col.values.splice(0, extra);
    }
  }

  // ---- rendering ---------------------------------------------------------------------------------
  let renderPending = false;
  function scheduleRender(jobsOnly) {
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(() => {
      renderPending = false;
      if (jobsOnly) renderJobs(); else render();
    });
  }

  function render() {
    renderTiles();
    renderNodes();
    renderJobs();
    renderShares();
    renderCharts();
    renderTraining();
    renderAlerts();
  }

  function renderTiles() {
    const snap = state.snapshot;
    if (!snap) return;
    const c = snap.counters || {};
    const ready = state.nodes.filter((n) => n.state === "ready").length;
    $("t-providers").textContent = ready + " / " + state.nodes.length;
    const live = snap.jobs || [];
    const counts = snap.live_counts;  // the snapshot lists only the oldest 100 queued jobs
    const running = counts ? counts.running : live.filter((j) => j.state === "running").length;
    const queued = counts ? counts.queued : live.length - running;
    $("t-jobs").textContent = running + " / " + queued;
    const total = state.series.total;
    const last = total.length ? total[total.length - 1] : 0;
    const recent = total.slice(-10);
    const avg = recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : 0;
    $("t-gflops").textContent = num(avg, 2) + " GFLOP/s";
    $("gflops-now").textContent = "now " + num(last, 2) + " GFLOP/s";
    $("t-subtasks").textContent = (c.subtasks_completed ?? 0).toLocaleString();
    $("t-retries").textContent = (c.subtasks_retried ?? 0) + " / " + (c.subtasks_failed ?? 0);
    $("t-bytes").textContent = bytes(c.bytes_out) + " / " + bytes(c.bytes_in);
    $("t-uptime").textContent = dur(snap.uptime_s);
  }

  function renderNodes() {
    const rows = state.nodes.slice().sort((a, b) => a.name.localeCompare(b.name));
    $("nodes-empty").hidden = rows.length > 0;
    $("nodes").hidden = rows.length === 0;
    // connected: providers the head hears from and gives work (ready, or draining what it has)
    const connected = rows.filter((n) => CONNECTED.has(n.state)).length;
    const dead = rows.filter((n) => n.state === "dead").length;
    // connected but given no work: acks missed (unhealthy) or compute hung (stuck)
    const sick = rows.filter((n) => n.state === "unhealthy" || n.state === "stuck").length;
    $("nodes-count").textContent = rows.length ? connected + " connected" + (sick ? " · " + sick + " unhealthy" : "")
      + (dead ? " · " + dead + " dead" : "") : "";
    $("nodes").tBodies[0].innerHTML = rows.map((n) => {
      const draining = n.state === "draining";
      const action = draining ? "undrain" : "drain";
      const hb = n.last_heartbeat_s;
      const button = n.state === "dead" ? "" : `<button data-action="${action}" data-pid="${esc(n.provider_id)}"
            title="${draining ? "give it work again" : "finish current work, take no new work"}">${action}</button>`;
      return `<tr class="node ${esc(n.state)}" data-provider-id="${esc(n.provider_id)}" data-name="${esc(n.name)}"
                  data-state="${esc(n.state)}">
        <td><span class="state-dot ${esc(n.state)}" title="${esc(n.state)}"></span>
          <span class="swatch" style="background:${colorOf(n.provider_id)}" title="its colour in the charts"></span>
          ${esc(n.name)} <span class="mono sub-id" title="${esc(n.provider_id)}">${esc(n.provider_id.slice(0, 8))}</span>
          <div class="sub">${esc(n.host)}</div></td>
        <td>${esc(n.device)}<div class="sub">${esc(n.device_name)}</div></td>
        <td>${esc(n.os)}<div class="sub">${n.cores} cores · ${bytes(n.memory_bytes)}</div></td>
        <td class="num">${num(n.gflops, 2)}</td>
        <td class="num">${n.assigned}</td>
        <td class="num">${n.subtasks_done}</td>
        <td class="num">${hb == null ? "–" : hb.toFixed(1) + " s ago"}</td>
        <td><span class="badge ${esc(n.state)}">${esc(n.state)}</span></td>
        <td class="num">${button}</td>
      </tr>`;
    }).join("");
  }

  $("nodes").tBodies[0].addEventListener("click", async (e) => {
    const btn = e.target.closest("button[data-action]");
    if (!btn) return;
    btn.disabled = true;
    await api(`/v1/nodes/${encodeURIComponent(btn.dataset.pid)}/${btn.dataset.action}`, { method: "POST" });
  });

  function renderJobs() {
    const now = Date.now() / 1000;
    const jobs = [...state.jobs.values()].sort((a, b) => b.created_at - a.created_at).slice(0, 20);
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs").hidden = jobs.length === 0;
    const live = jobs.filter((j) => j.state === "running" || j.state === "queued").length;
    $("jobs-count").textContent = jobs.length ? `${live} live · ${jobs.length} shown` : "";
    $("jobs").tBodies[0].innerHTML = jobs.map((j) => {
      const p = j.progress || { done: 0, total: 0 };
      const frac = j.state === "done" ? 1 : (p.total ? p.done / p.total : 0);
      const pct = Math.round(frac * 100);
      const shares = Object.entries(j.shares || {}).sort((a, b) => b[1] - a[1])
        .map(([name, f]) => `${esc(name)} ${Math.round(f * 100)}%`).join(" · ");
      let time;
      if (j.finished_at) time = dur(j.finished_at - (j.started_at || j.created_at));
      else if (j.started_at) time = dur(now - j.started_at);
      else time = "waiting " + dur(now - j.created_at);
      const shape = j.inputs && j.inputs.a ? j.inputs.a.shape.join("×") + (j.inputs.b ? " · " +
        j.inputs.b.shape.join("×") : "") : "";
      const note = j.error ? `<div class="sub" title="${esc(j.error)}">${esc(j.error.slice(0, 80))}</div>`
        : (j.waiting ? `<div class="sub">${esc(j.waiting.slice(0, 80))}</div>` : "");
      return `<tr class="job" data-job-id="${esc(j.job_id)}" data-state="${esc(j.state)}"
                  data-done="${p.done}" data-total="${p.total}">
        <td class="mono" title="${esc(j.job_id)}">${esc(j.job_id.slice(0, 8))}</td>
        <td>${esc(j.type)}<div class="sub">${esc(shape)}</div></td>
        <td><span class="badge ${esc(j.state)}">${esc(j.state)}</span>${note}</td>
        <td><div class="bar-wrap"><div class="bar ${esc(j.state)}"><span style="width:${pct}%"></span></div>
          <span class="pct">${p.done}/${p.total}${p.unit ? " " + esc(p.unit) : ""} · ${pct}%</span></div></td>
        <td class="sub">${shares || "–"}</td>
        <td class="num">${time}</td>
      </tr>`;
    }).join("");
  }

  function renderShares() {
    const shares = state.shares.slice().sort((a, b) => b.share - a.share);
    if (!shares.length) {
      $("shares").innerHTML = '<p class="empty">No work done yet.</p>';
      return;
    }
    $("shares").innerHTML = shares.map((s) => `
      <div class="share" data-provider-id="${esc(s.provider_id)}">
        <span class="name" title="${esc(s.provider_id)}">${esc(s.name)}</span>
        <div class="bar" style="--c:${colorOf(s.provider_id)}"><span style="width:${(s.share * 100).toFixed(1)}%"></span></div>
        <span class="what">${(s.share * 100).toFixed(1)}% · ${s.subtasks_done} subtasks</span>
      </div>`).join("");
  }

  // ---- charts (uPlot) ----------------------------------------------------------------------------
  const charts = {};
  const axis = { stroke: "#8793a1", grid: { stroke: "#222a34", width: 1 }, ticks: { stroke: "#222a34", width: 1 } };
  const zeroBased = (u, min, max) => [0, max > 0 ? max * 1.15 : 1];
  const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400];

  function chart(key, el, series, data, opts = {}) {
    const sig = series.map((s) => s.label).join("|");
    let c = charts[key];
    if (c && c.sig !== sig) {
      c.plot.destroy();
      c = null;
    }
    if (!c) {
      const height = el.classList.contains("small") ? 160 : 220;
      const time = opts.time !== false;
      const xAxis = time
        ? Object.assign({}, axis, { space: 70, incrs: TIME_INCRS, values: (u, v) => v.map(clock) })
        : Object.assign({}, axis, { space: 50, values: (u, v) => v.map((x) => num(x, 0)) });
      const plot = new uPlot({
        width: Math.max(200, el.clientWidth),
        height,
        scales: { x: { time }, y: { range: opts.yRange || zeroBased } },
        axes: [xAxis, Object.assign({}, axis, { size: 48, values: (u, v) => v.map((x) => num(x, 2)) })],
        series: [{ label: opts.xLabel || "time", value: (u, v) => (v == null ? "–" : time ? clock(v) : num(v, 0)) },
          ...series.map((s) => Object.assign({ value: (u, v) => (v == null ? "–" : num(v, 3)) }, s))],
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      }, data, el);
      c = charts[key] = { plot, sig, el };
    } else {
      c.plot.setData(data);
    }
  }

  window.addEventListener("resize", () => {
    for (const c of Object.values(charts)) c.plot.setSize({ width: Math.max(200, c.el.clientWidth), height: c.plot.height });
  });

  function renderCharts() {
    const S = state.series;
    chart("throughput", $("chart-throughput"),
      [{ label: "cluster GFLOP/s", stroke: COLORS[0], fill: "rgba(78,161,255,0.12)", width: 2 }],
      [S.t, S.total]);
    const pids = Object.keys(S.providers);
    chart("providers", $("chart-providers"),
      pids.map((pid) => ({ label: S.providers[pid].name, stroke: colorOf(pid), width: 1.5, spanGaps: false })),
      [S.t, ...pids.map((pid) => S.providers[pid].values)]);
  }

  function renderTraining() {
    const jobs = Object.keys(state.training);
    $("train-empty").hidden = jobs.length > 0;
    $("train-charts").hidden = jobs.length === 0;
    const sel = $("train-job");
    sel.hidden = jobs.length < 2;
    if (!jobs.length) return;
    if (!state.trainJob || !state.training[state.trainJob]) state.trainJob = jobs[jobs.length - 1];
    const opts = jobs.map((j) => `<option value="${esc(j)}"${j === state.trainJob ? " selected" : ""}>job ${esc(j.slice(0, 8))}</option>`).join("");
    if (sel.innerHTML !== opts) sel.innerHTML = opts;
    const points = state.training[state.trainJob];
    const steps = points.map((p) => p.step);
    const byStep = steps.every((s, i) => s != null && (i === 0 || s > steps[i - 1]));
    const x = byStep ? steps : points.map((p, i) => i + 1);
    const col = (name) => points.map((p) => (p[name] == null ? null : p[name]));
    const xLabel = byStep ? "step" : "update";
    chart("loss", $("chart-loss"), [
      { label: "loss", stroke: COLORS[3], width: 2, spanGaps: true },
      { label: "test loss", stroke: COLORS[2], width: 2, spanGaps: true, dash: [6, 4] },
    ], [x, col("loss"), col("test_loss")], { time: false, xLabel });
    chart("acc", $("chart-acc"), [
      { label: "accuracy", stroke: COLORS[1], width: 2, spanGaps: true },
      { label: "test accuracy", stroke: COLORS[5], width: 2, spanGaps: true, dash: [6, 4] },
    ], [x, col("accuracy"), col("test_accuracy")], { time: false, xLabel, yRange: (u, min, max) => [0, Math.max(1, max)] });
  }

  $("train-job").addEventListener("change", (e) => {
    state.trainJob = e.target.value;
    state.trainPinned = true;
    renderTraining();
  });

  function renderAlerts() {
    $("alerts-empty").hidden = state.alerts.length > 0;
    $("alerts-count").textContent = state.alerts.length ? String(state.alerts.length) : "";
    $("alerts").innerHTML = state.alerts.map((a) => `
      <li class="${esc(a.level)}" data-kind="${esc(a.kind)}"><span class="time">${clock(a.ts)}</span>
        <span class="title">${esc(a.title)}</span><span>${esc(a.message)}</span></li>`).join("");
  }

  function describe(ev) {
    const job = ev.job_id ? "job " + ev.job_id.slice(0, 8) : "";
    switch (ev.kind) {
      case "job.progress": return `${job}: ${ev.done}/${ev.total} ${ev.unit || ""}`.trimEnd();
      case "job.started": return `${job}: ${ev.subtasks} subtasks, ${ev.total} ${ev.unit || "subtasks"}`;
      case "job.done": return `${job}${ev.seconds != null ? " in " + dur(ev.seconds) : ""}`;
      case "job.failed": return `${job}: ${ev.error || ""}`;
      case "job.metrics": {
        const parts = [job, ev.epoch != null ? "epoch " + ev.epoch : "", ev.step != null ? "step " + ev.step : ""];
        for (const [k, label] of [["loss", "loss"], ["test_loss", "test loss"], ["test_accuracy", "test acc"]]) {
          if (typeof ev[k] === "number") parts.push(label + " " + ev[k].toFixed(3));
        }
        return parts.filter(Boolean).join(" · ");
      }
      case "node.registered": return `${ev.name} (${ev.device}, ${num(ev.gflops, 1)} GFLOP/s)`;
      case "node.lost": return `${ev.name || (ev.provider_id || "").slice(0, 8)}: ${ev.requeued} re-queued`;
      default: {
        const who = ev.name || (ev.provider_id ? ev.provider_id.slice(0, 8) : "");
        return [job, who].filter(Boolean).join(" · ");
      }
    }
  }

  function renderEvents() {
    $("events").innerHTML = state.events.slice(0, MAX_EVENTS).map((e) => `
      <li data-seq="${e.seq}"><span class="time">${clock(e.ts)}</span><span class="kind">${esc(e.kind)}</span>
        <span>${esc(describe(e))}</span></li>`).join("") || '<li class="empty">waiting for events…</li>';
  }

  // relative times ("3.1 s ago", running durations) move even between snapshots
  setInterval(() => { if (state.snapshot) renderJobs(); }, 1000);

  // read-only access for the browser console and the headless-browser test
  window.dcfDashboard = { series: () => state.series, events: () => state.events.slice() };

  renderEvents();
  connect();
})();
