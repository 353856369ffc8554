/* The simvue dashboard: runs list and run pages, drawn with uPlot from the server's API
   (/api/runs, /api/events, /api/runs/{id}/artifacts and /api/dashboard/...).  No build step:
   this file is served as it is.  Text from runs is always set with textContent, never parsed
   as HTML. */
"use strict";
(() => {
  // -- small helpers --------------------------------------------------------------------------

  const $ = (selector, root = document) => root.querySelector(selector);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const PALETTE = ["#2f6fdb", "#d1453b", "#2e9e5b", "#d9822b", "#8a5cc2", "#1fa3a3", "#c23f87", "#7a8b1f",
    "#5470c6", "#b5651d", "#3b8ea5", "#e06666", "#6aa84f", "#9e7bb5", "#c9a227", "#4d4d4d"];
  const MAX_LINES = 16; // above this many processes a metric is drawn as a band and its outliers
  const LEVEL_COLOURS = { warning: "#d9822b", error: "#d1453b", critical: "#d1453b", info: "#6b7484", debug: "#9aa3b2" };

  function fmtTime(iso) {
    if (!iso) return "";
    const date = new Date(iso.endsWith("Z") || /[+-]\d\d:\d\d$/.test(iso) ? iso : iso + "Z");
    return isNaN(date) ? iso : date.toLocaleString();
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    seconds = Math.max(0, seconds);
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = Math.floor(seconds % 60);
    return h ? `${h} h ${m} min` : `${m} min ${s} s`;
  }

  function fmtNum(value) {
    if (value === null || value === undefined) return "";
    if (typeof value !== "number") return String(value);
    if (!isFinite(value)) return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e15) return value.toLocaleString();
    const abs = Math.abs(value);
    if (abs !== 0 && (abs >= 1e6 || abs < 1e-3)) return value.toExponential(3);
    return Number(value.toPrecision(5)).toLocaleString();
  }

  function runtimeSeconds(text) {
    // the API's runtime: "HH:MM:SS.ffffff" or "N days, HH:MM:SS"
    if (!text) return null;
    const match = /^(?:(\d+) days?, )?(\d+):(\d+):(\d+(?:\.\d+)?)$/.exec(text);
    if (!match) return null;
    return (+match[1] || 0) * 86400 + (+match[2]) * 3600 + (+match[3]) * 60 + (+match[4]);
  }

  function badge(status) { return el("span", { class: `badge ${status}`, text: status }); }

  // -- the API --------------------------------------------------------------------------------

  const TOKEN_KEY = "simvue.token";

  function takeTokenFromUrl() {
    const url = new URL(location.href);
    const token = url.searchParams.get("token");
    if (token) {
      localStorage.setItem(TOKEN_KEY, token);
      url.searchParams.delete("token");
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
  }

  let asking = null;
  function askForToken() {
    if (!asking) {
      asking = new Promise((resolve) => {
        const dialog = $("#token-dialog");
        $("#token-form").onsubmit = () => {
          localStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
          asking = null;
          resolve();
        };
        dialog.showModal();
      });
    }
    return asking;
  }

  async function api(path, params = {}) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value === undefined || value === null) continue;
      for (const item of Array.isArray(value) ? value : [value]) query.append(key, item);
    }
    const url = `/api${path}${query.toString() ? "?" + query : ""}`;
    for (let attempt = 0; attempt < 3; attempt++) {
      const response = await fetch(url, { headers: { Authorization: `Bearer ${localStorage.getItem(TOKEN_KEY) || ""}` } });
      if (response.status === 401) { await askForToken(); continue; }
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        const detail = body && body.detail;
        throw new Error(typeof detail === "string" ? detail : `${response.status} ${response.statusText}`);
      }
      return body;
    }
    throw new Error("the server did not accept the token");
  }

  // -- live refresh ---------------------------------------------------------------------------

  const live = { paused: false, timer: null, tick: null, busy: false };

  function interval() { return 1000 * Number($("#live-interval").value); }

  function schedule() {
    clearTimeout(live.timer);
    if (live.paused || !live.tick) return;
    live.timer = setTimeout(async () => {
      if (!live.busy && live.tick) {
        live.busy = true;
        try { await live.tick(); } catch (error) { console.warn(error); } finally { live.busy = false; }
      }
      schedule();
    }, interval());
  }

  function setLive(tick) { live.tick = tick; schedule(); }

  function setupLiveControls() {
    $("#live-pause").addEventListener("click", () => {
      live.paused = !live.paused;
      $("#live-pause").textContent = live.paused ? "Resume" : "Pause";
      $("#live-state").textContent = live.paused ? "paused" : "live";
      $("#live").classList.toggle("paused", live.paused);
      schedule();
    });
    $("#live-interval").addEventListener("change", schedule);
  }

  // -- routing --------------------------------------------------------------------------------

  function navigate(path) {
    history.pushState(null, "", path);
    route();
  }

  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-nav]");
    if (link && !event.ctrlKey && !event.metaKey && event.button === 0) {
      event.preventDefault();
      navigate(link.getAttribute("href"));
    }
  });
  window.addEventListener("popstate", route);

  function route() {
    setLive(null);
    charts.destroyAll();
    const match = /^\/dashboard\/runs\/run\/([^/]+)\/?$/.exec(location.pathname);
    const main = $("#main");
    main.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
    const shown = match ? showRun(main, decodeURIComponent(match[1])) : showRuns(main);
    shown.catch((error) => main.replaceChildren(el("p", { class: "error", text: `Could not load this page: ${error.message}` })));
  }

  // -- charts ---------------------------------------------------------------------------------

  const charts = {
    live: new Set(),
    add(chart) { this.live.add(chart); return chart; },
    destroyAll() { for (const chart of this.live) chart.destroy(); this.live.clear(); },
  };

  function markerPlugin(markers) {
    return {
      hooks: {
        draw: [(u) => {
          const { ctx } = u;
          const { top, height } = u.bbox;
          ctx.save();
          for (const marker of markers()) {
            const x = u.valToPos(marker.x, "x", true);
            if (!(x >= u.bbox.left && x <= u.bbox.left + u.bbox.width)) continue;
            ctx.strokeStyle = marker.kind === "alert" ? "#d1453b" : (LEVEL_COLOURS[marker.level] || "#6b7484");
            ctx.setLineDash(marker.kind === "alert" ? [] : [4, 3]);
            ctx.lineWidth = 1.5 * devicePixelRatio;
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
          }
          ctx.restore();
        }],
      },
    };
  }

  /* A line chart of ``lines`` ([{label, x, y, colour, band: "lo"|"hi"|undefined}]) whose x
     arrays may differ (they are joined).  ``bands`` pairs lo/hi lines by label.  ``fetch(lo, hi,
     width)`` gives new lines for a zoom (null lo/hi: everything). */
  function lineChart(container, { title, note, xLabel, fetch, markers, height = 220 }) {
    const box = el("div", { class: "chart", dataset: { title } }, el("h3", { text: title }), note ? el("div", { class: "note", text: note }) : null);
    const holder = el("div");
    box.append(holder);
    container.append(box);
    let plot = null, zoom = null, lines = [], markerList = [];
    const width = () => Math.max(200, holder.clientWidth || 520);

    function build(data) {
      const series = [{ label: xLabel }];
      const bands = [];
      lines.forEach((line, i) => {
        const colour = line.colour || PALETTE[i % PALETTE.length];
        const s = { label: line.label, stroke: colour, width: line.band ? 0.5 : 1.5, spanGaps: true, points: { show: false } };
        if (line.band) s.stroke = colour + "66";
        series.push(s);
      });
      lines.forEach((line, i) => {
        if (line.band === "hi") {
          const lo = lines.findIndex((other) => other.band === "lo" && other.group === line.group);
          if (lo >= 0) bands.push({ series: [i + 1, lo + 1], fill: (line.colour || PALETTE[i % PALETTE.length]) + "22" });
        }
      });
      const options = {
        width: width(), height, series, bands, legend: { live: true },
        scales: { x: { time: false } },
        axes: [{ label: xLabel, size: 36 }, { size: 56 }],
        cursor: { drag: { x: true, y: false } },
        plugins: [markerPlugin(() => markerList)],
        hooks: { setSelect: [(u) => {
          if (u.select.width < 3) return;
          const lo = u.posToVal(u.select.left, "x"), hi = u.posToVal(u.select.left + u.select.width, "x");
          u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
          zoom = [lo, hi];
          refresh();
        }] },
      };
      options.cursor.drag.setScale = false;
      if (plot) plot.destroy();
      plot = new uPlot(options, data, holder);
      box.dataset.lines = String(lines.length); // what is drawn, for whoever checks the page
      box.dataset.bands = String(bands.length);
      holder.ondblclick = () => { zoom = null; refresh(); };
    }

    function joined() {
      if (!lines.length) return [[]];
      return uPlot.join(lines.map((line) => [line.x, line.y]));
    }

    async function refresh() {
      const [got, gotMarkers] = await Promise.all([fetch(zoom ? zoom[0] : null, zoom ? zoom[1] : null, width()),
        markers ? markers() : Promise.resolve([])]);
      const same = got.length === lines.length && got.every((line, i) => line.label === lines[i].label);
      lines = got;
      markerList = gotMarkers;
      if (!lines.length) {
        if (plot) { plot.destroy(); plot = null; }
        holder.replaceChildren(el("div", { class: "empty", text: "no points" }));
        return;
      }
      const data = joined();
      if (plot && same) {
        plot.setData(data, true);
        if (zoom) plot.setScale("x", { min: zoom[0], max: zoom[1] });
      } else {
        holder.replaceChildren();
        build(data);
        if (zoom) plot.setScale("x", { min: zoom[0], max: zoom[1] });
      }
    }

    const resized = new ResizeObserver(() => {
      if (plot && Math.abs(plot.width - width()) > 4) plot.setSize({ width: width(), height });
    });
    resized.observe(holder);

    const chart = {
      refresh,
      destroy() { resized.disconnect(); if (plot) plot.destroy(); plot = null; },
      get plot() { return plot; },
      get lines() { return lines; },
    };
    charts.add(chart);
    return chart;
  }

  // -- runs list ------------------------------------------------------------------------------

  const listState = { name: "", status: "", folder: "", tag: "", sort: "created", desc: true };
  const STATUSES = ["running", "completed", "failed", "terminated", "lost", "created"];

  async function showRuns(main) {
    document.title = "Runs · simvue";
    const filters = el("div", { class: "filters" },
      el("input", { id: "filter-name", placeholder: "name contains", value: listState.name }),
      el("select", { id: "filter-status" }, el("option", { value: "", text: "any status" }),
        ...STATUSES.map((s) => el("option", { value: s, text: s, selected: s === listState.status }))),
      el("input", { id: "filter-folder", placeholder: "folder", value: listState.folder }),
      el("input", { id: "filter-tag", placeholder: "tag", value: listState.tag }));
    const table = el("table", { id: "runs" });
    const count = el("p", { class: "muted" });
    main.replaceChildren(el("h1", { text: "Runs" }), filters, el("div", { class: "panel" }, table, count));

    let typing = null;
    for (const [id, key] of [["filter-name", "name"], ["filter-status", "status"], ["filter-folder", "folder"], ["filter-tag", "tag"]]) {
      $(`#${id}`).addEventListener("input", (event) => {
        listState[key] = event.target.value.trim();
        clearTimeout(typing);
        typing = setTimeout(load, 250);
      });
    }

    const columns = [
      ["name", "Name"], ["status", "Status"], ["folder", "Folder"], ["tags", "Tags", false],
      ["processes", "Processes", true, "num"], ["points", "Points", true, "num"], ["created", "Created"], ["runtime", "Duration", true, "num"],
    ];

    async function load() {
      const query = [];
      if (listState.name) query.push(`name contains ${listState.name}`);
      if (listState.status) query.push(`status == ${listState.status}`);
      if (listState.folder) query.push(`folder.path contains ${listState.folder}`);
      if (listState.tag) query.push(`has tag.${listState.tag}`);
      const answer = await api("/runs", { filters: JSON.stringify(query), count: 500 });
      render(answer.data, answer.count);
    }

    function value(run, key) {
      switch (key) {
        case "processes": return Object.keys(((run.metadata || {}).simvue || {}).processes || {}).length || 1;
        case "points": return Object.values(run.metrics || {}).reduce((sum, m) => sum + (m.count || 0), 0);
        case "runtime": return runtimeSeconds(run.runtime);
        case "tags": return (run.tags || []).join(",");
        default: return run[key] ?? "";
      }
    }

    function render(runs, total) {
      const sorted = runs.slice().sort((a, b) => {
        const va = value(a, listState.sort), vb = value(b, listState.sort);
        const order = typeof va === "number" && typeof vb === "number" ? va - vb : String(va).localeCompare(String(vb));
        return listState.desc ? -order : order;
      });
      const head = el("tr", {}, ...columns.map(([key, label, sortable = true, cls]) => {
        const th = el("th", { text: label, class: [sortable ? "sortable" : "", cls || "",
          listState.sort === key ? (listState.desc ? "sorted-desc" : "sorted-asc") : ""].join(" ").trim() });
        if (sortable) th.addEventListener("click", () => {
          if (listState.sort === key) listState.desc = !listState.desc; else { listState.sort = key; listState.desc = false; }
          render(runs, total);
        });
        return th;
      }));
      const rows = sorted.map((run) => el("tr", { dataset: { run: run.id } },
        el("td", {}, el("a", { href: `/dashboard/runs/run/${encodeURIComponent(run.id)}`, "data-nav": true, text: run.name })),
        el("td", { class: "status" }, badge(run.status)),
        el("td", { text: run.folder }),
        el("td", {}, ...(run.tags || []).map((tag) => el("span", { class: "tag", text: tag }))),
        el("td", { class: "num", text: value(run, "processes") }),
        el("td", { class: "num", text: fmtNum(value(run, "points")) }),
        el("td", { text: fmtTime(run.created) }),
        el("td", { class: "num", text: fmtDuration(runtimeSeconds(run.runtime)) })));
      table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
      if (!rows.length) table.append(el("tbody", {}, el("tr", {}, el("td", { colspan: columns.length, class: "empty", text: "No runs match." }))));
      count.textContent = total > runs.length ? `${runs.length} of ${total} runs (the newest)` : `${total} run${total === 1 ? "" : "s"}`;
    }

    await load();
    setLive(load);
  }

  // -- run page -------------------------------------------------------------------------------

  const TABS = [["metrics", "Metrics"], ["ranks", "Ranks"], ["resources", "Resources"], ["events", "Events"],
    ["alerts", "Alerts"], ["artifacts", "Artifacts"], ["metadata", "Metadata"]];

  async function showRun(main, runId) {
    let view = await api(`/dashboard/runs/${encodeURIComponent(runId)}`);
    const page = { runId, view, xAxis: "step", tab: (location.hash || "#metrics").slice(1) };
    if (!TABS.some(([key]) => key === page.tab)) page.tab = "metrics";
    const head = el("div", { class: "panel", id: "run-head" });
    const tabs = el("nav", { class: "tabs" });
    const body = el("div", { id: "tab-body" });
    main.replaceChildren(head, tabs, body);

    function renderHead() {
      const run = view.run;
      document.title = `${run.name} · simvue`;
      const ranks = Object.keys(view.processes).length;
      const critical = (run.alerts || []).filter((a) => a.status === "critical").length;
      head.replaceChildren(
        el("div", { class: "run-head" }, el("h1", { id: "run-name", text: run.name }), badge(run.status),
          el("span", { class: "muted", text: run.folder })),
        el("div", { class: "facts" },
          el("span", {}, "duration ", el("b", { id: "run-duration", text: fmtDuration(view.duration_s) })),
          el("span", {}, "processes ", el("b", { id: "run-processes", text: ranks || 1 })),
          el("span", {}, "nodes ", el("b", { text: view.nodes.length || 1 })),
          el("span", {}, "points ", el("b", { id: "run-points", text: fmtNum(Object.values(view.points).reduce((a, b) => a + b, 0)) })),
          el("span", {}, "events ", el("b", { text: fmtNum(view.events) })),
          el("span", {}, "alerts ", el("b", { text: `${(run.alerts || []).length}` + (critical ? ` (${critical} critical)` : "") })),
          el("span", {}, "created ", el("b", { text: fmtTime(run.created) })),
          el("span", {}, "updated ", el("b", { text: fmtTime(view.updated) }))));
    }

    function renderTabs() {
      tabs.replaceChildren(...TABS.map(([key, label]) => el("a", {
        href: `#${key}`, class: key === page.tab ? "active" : "", dataset: { tab: key }, text: label,
        onclick: (event) => { event.preventDefault(); history.replaceState(null, "", `#${key}`); page.tab = key; renderTabs(); openTab(); },
      })));
    }

    let tabRefresh = null;
    async function openTab() {
      charts.destroyAll();
      body.replaceChildren();
      const show = { metrics: metricsTab, ranks: ranksTab, resources: resourcesTab, events: eventsTab,
        alerts: alertsTab, artifacts: artifactsTab, metadata: metadataTab }[page.tab];
      try {
        tabRefresh = await show(body, page);
      } catch (error) {
        body.replaceChildren(el("p", { class: "error", text: `Could not load this tab: ${error.message}` }));
        tabRefresh = null;
      }
    }

    page.reopen = openTab;
    renderHead();
    renderTabs();
    await openTab();
    setLive(async () => {
      view = page.view = await api(`/dashboard/runs/${encodeURIComponent(runId)}`);
      renderHead();
      if (tabRefresh) await tabRefresh();
    });
  }

  function xToolbar(page) {
    const select = el("select", { id: "x-axis" }, el("option", { value: "step", text: "step", selected: page.xAxis === "step" }),
      el("option", { value: "time", text: "time (s)", selected: page.xAxis === "time" }));
    select.addEventListener("change", () => { page.xAxis = select.value; page.xChosen = true; page.reopen(); });
    return el("label", {}, "x axis ", select);
  }

  function markersOf(page) {
    // one request for every chart refreshed together
    return () => {
      const cached = page.markers;
      if (cached && cached.x === page.xAxis && performance.now() - cached.at < 1000) return cached.promise;
      const promise = api(`/dashboard/runs/${encodeURIComponent(page.runId)}/markers`, { x: page.xAxis }).then((got) => got.markers);
      page.markers = { x: page.xAxis, at: performance.now(), promise };
      return promise;
    };
  }

  function linesOf(page, names, labels) {
    return async (lo, hi, width) => {
      if (!names.length) return [];
      const got = await api(`/dashboard/runs/${encodeURIComponent(page.runId)}/lines`,
        { name: names, width: Math.min(2000, Math.round(width)), x: page.xAxis, lo, hi });
      return names.filter((name) => got[name]).map((name, i) => ({ label: labels ? labels[i] : name, x: got[name].x, y: got[name].y }));
    };
  }

  function bandOf(page, metric, kind) {
    return async (lo, hi, width) => {
      const got = await api(`/dashboard/runs/${encodeURIComponent(page.runId)}/band`,
        { metric, kind, width: Math.min(1000, Math.round(width / 2)), x: page.xAxis, lo, hi, outliers: 3 });
      if (!got.edges.length) return [];
      const centres = got.edges.slice(0, -1).map((edge, i) => (edge + got.edges[i + 1]) / 2);
      const lines = [
        { label: "min over processes", x: centres, y: got.columns.min, band: "lo", group: "all", colour: "#2f6fdb" },
        { label: "max over processes", x: centres, y: got.columns.max, band: "hi", group: "all", colour: "#2f6fdb" },
        { label: "mean over processes", x: centres, y: got.columns.mean, colour: "#1d2430" },
      ];
      Object.entries(got.outliers).forEach(([label, line], i) => lines.push({ label, x: line.x, y: line.y, colour: PALETTE[(i + 1) % PALETTE.length] }));
      return lines;
    };
  }

  // Metrics tab: plain lines, reduced metrics as mean + min–max band, per-process metrics as
  // overlaid lines (up to MAX_LINES processes) or as a band with the outlying processes.
  async function metricsTab(body, page) {
    const groups = page.view.groups;
    if (!page.xChosen) page.xAxis = "step";
    const all = [];
    const grid = el("div", { class: "charts" });
    body.append(el("div", { class: "toolbar" }, xToolbar(page)), grid);
    const xLabel = () => (page.xAxis === "step" ? "step" : "time (s)");
    const markers = markersOf(page);
    for (const [base, kinds] of Object.entries(groups.reduced)) {
      const names = [], labels = [], bandKinds = [];
      for (const kind of kinds) if (kind !== "count") { names.push(`${base}.${kind}`); labels.push(`${base}.${kind}`); bandKinds.push(kind); }
      const fetchLines = linesOf(page, names, labels);
      all.push(lineChart(grid, { title: `${base} (over ranks)`, note: "mean, with the min–max band", xLabel: xLabel(), markers,
        fetch: async (lo, hi, width) => (await fetchLines(lo, hi, width)).map((line, i) => ({ ...line,
          band: bandKinds[i] === "min" ? "lo" : bandKinds[i] === "max" ? "hi" : undefined, group: base,
          colour: bandKinds[i] === "mean" ? "#1d2430" : "#2f6fdb" })) }));
    }
    for (const [base, labels] of Object.entries(groups.per_process)) {
      if (labels.length <= MAX_LINES) {
        all.push(lineChart(grid, { title: `${base} per process`, note: `${labels.length} processes`, xLabel: xLabel(), markers,
          fetch: linesOf(page, labels.map((label) => `${label}/${base}`), labels) }));
      } else {
        all.push(lineChart(grid, { title: `${base} per process`, note: `${labels.length} processes: min–max band, mean and the 3 furthest from the others`,
          xLabel: xLabel(), markers, fetch: bandOf(page, base, "metric") }));
      }
    }
    for (const name of groups.plain) {
      all.push(lineChart(grid, { title: name, xLabel: xLabel(), markers, fetch: linesOf(page, [name]) }));
    }
    if (!all.length) grid.append(el("p", { class: "empty", text: "This run has no metrics yet." }));
    await Promise.all(all.map((chart) => chart.refresh()));
    return () => Promise.all(all.map((chart) => chart.refresh()));
  }

  // Colours for heat maps: a perceptually even ramp (viridis, sampled).
  const RAMP = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70", "#7ad151", "#bddf26", "#fde725"];
  function rampColour(t) {
    if (t === null || !isFinite(t)) return "#e8eaee";
    const i = Math.max(0, Math.min(RAMP.length - 1, Math.round(t * (RAMP.length - 1))));
    return RAMP[i];
  }

  // One process × step heat map, with its margins, imbalance, table and the chosen row's line.
  async function heatView(container, page, metric, kind) {
    const root = el("div", { class: "heat-view" });
    container.append(root);
    let selected = null, data = null;

    const canvas = el("canvas", { id: "heatmap", height: 240 });
    const right = el("canvas", { height: 240 });
    const labels = el("div", { class: "labels", id: "heat-labels" });
    const scale = el("div", { class: "scale" });
    const topHolder = el("div", { class: "margin-top" });
    const rowHolder = el("div", { class: "chart" }, el("div", { class: "empty", text: "Click a row of the heat map or of the table to see that process's line." }));
    const imbalanceHolder = el("div");
    const table = el("table", { id: "rank-table" });
    root.append(
      el("div", { class: "panel" },
        el("h3", { text: `${metric}: process × ${page.xAxis === "step" ? "step" : "time"}` }),
        el("div", { class: "heat" }, el("div"), topHolder, el("div"), labels, canvas, right),
        scale, el("div", { class: "note muted", text: "Each cell: the process's mean over that column. Right: each process's mean over the range. Click a row to see that process." })),
      el("div", { class: "charts" }, rowHolder, imbalanceHolder),
      el("div", { class: "panel" }, el("h3", { text: "Per process" }), el("div", { class: "scroll" }, table)));

    const top = lineChart(topHolder, { title: "over processes: mean, min–max", xLabel: page.xAxis, height: 160, markers: markersOf(page),
      fetch: async () => {
        if (!data || !data.edges.length) return [];
        const centres = data.edges.slice(0, -1).map((edge, i) => (edge + data.edges[i + 1]) / 2);
        return [{ label: "min", x: centres, y: data.columns.min, band: "lo", group: "m", colour: "#2f6fdb" },
          { label: "max", x: centres, y: data.columns.max, band: "hi", group: "m", colour: "#2f6fdb" },
          { label: "mean", x: centres, y: data.columns.mean, colour: "#1d2430" }];
      } });
    const imbalance = lineChart(imbalanceHolder, { title: "imbalance: (max − min) / mean of the cells", xLabel: page.xAxis, height: 180,
      markers: markersOf(page),
      fetch: async () => {
        if (!data || !data.edges.length) return [];
        const centres = data.edges.slice(0, -1).map((edge, i) => (edge + data.edges[i + 1]) / 2);
        return [{ label: "imbalance", x: centres, y: data.imbalance, colour: "#d1453b" }];
      } });
    let rowChart = null;

    function rowName(label) { return kind === "metric" ? `${label}/${metric}` : `resources/${label}/${metric}`; }

    function select(label) {
      selected = label;
      for (const div of labels.children) div.classList.toggle("selected", div.dataset.label === label);
      rowHolder.replaceChildren();
      rowHolder.className = "";
      rowChart = lineChart(rowHolder, { title: `${label}: ${metric}`, xLabel: page.xAxis, markers: markersOf(page),
        fetch: linesOf(page, [rowName(label)], [label]) });
      rowChart.refresh();
    }

    function draw() {
      const rows = data.labels.length, cols = data.edges.length - 1;
      const width = Math.max(200, canvas.clientWidth || 600);
      const rowHeight = Math.max(4, Math.min(28, Math.floor(480 / Math.max(1, rows))));
      const height = rowHeight * rows;
      for (const c of [canvas, right]) { c.width = (c === right ? 120 : width) * devicePixelRatio; c.height = height * devicePixelRatio; c.style.height = `${height}px`; }
      labels.style.height = `${height}px`;
      const values = data.cells.flat().filter((v) => v !== null);
      const lo = values.length ? Math.min(...values) : 0, hi = values.length ? Math.max(...values) : 1;
      const span = hi > lo ? hi - lo : 1;
      const ctx = canvas.getContext("2d");
      ctx.scale(devicePixelRatio, devicePixelRatio);
      const cellWidth = width / Math.max(1, cols);
      data.cells.forEach((row, r) => row.forEach((value, c) => {
        ctx.fillStyle = rampColour(value === null ? null : (value - lo) / span);
        ctx.fillRect(c * cellWidth, r * rowHeight, Math.ceil(cellWidth), rowHeight);
      }));
      const rctx = right.getContext("2d");
      rctx.scale(devicePixelRatio, devicePixelRatio);
      const means = data.rows.map((row) => row.mean);
      const finite = means.filter((m) => m !== null);
      const mlo = Math.min(0, ...finite), mhi = Math.max(...finite, 0) || 1;
      data.rows.forEach((row, r) => {
        if (row.mean === null) return;
        rctx.fillStyle = "#5470c6";
        const w = Math.max(1, 110 * (row.mean - mlo) / ((mhi - mlo) || 1));
        rctx.fillRect(0, r * rowHeight + 1, w, Math.max(1, rowHeight - 2));
      });
      const every = Math.ceil(13 / rowHeight); // a label on every row that has room for one
      labels.replaceChildren(...data.labels.map((label, r) => el("div", { dataset: { label }, text: r % every ? "" : label,
        title: label, class: label === selected ? "selected" : "", onclick: () => select(label) })));
      canvas.onclick = (event) => {
        const r = Math.floor((event.offsetY / canvas.clientHeight) * rows);
        if (data.labels[r]) select(data.labels[r]);
      };
      canvas.title = "click a row to open that process";
      const bar = el("canvas", { width: 160, height: 10 });
      const bctx = bar.getContext("2d");
      RAMP.forEach((colour, i) => { bctx.fillStyle = colour; bctx.fillRect((i * 160) / RAMP.length, 0, 160 / RAMP.length + 1, 10); });
      scale.replaceChildren(el("span", { text: fmtNum(lo) }), bar, el("span", { text: fmtNum(hi) }),
        el("span", { text: `worst process most often: ${mostOften(data.worst) || "none"}` }));
      renderTable();
    }

    const tableSort = { key: "label", desc: false };
    function renderTable() {
      const cols = [["label", "Process"], ["min", "Min"], ["mean", "Mean"], ["max", "Max"], ["points", "Points"]];
      const order = data.rows.slice().sort((a, b) => {
        const va = a[tableSort.key], vb = b[tableSort.key];
        const d = tableSort.key === "label" ? data.labels.indexOf(va) - data.labels.indexOf(vb) : (va ?? -Infinity) - (vb ?? -Infinity);
        return tableSort.desc ? -d : d;
      });
      table.replaceChildren(
        el("thead", {}, el("tr", {}, ...cols.map(([key, label]) => el("th", {
          class: `sortable ${key === "label" ? "" : "num"} ${tableSort.key === key ? (tableSort.desc ? "sorted-desc" : "sorted-asc") : ""}`,
          text: label, onclick: () => { if (tableSort.key === key) tableSort.desc = !tableSort.desc; else { tableSort.key = key; tableSort.desc = key !== "label"; } renderTable(); },
        })))),
        el("tbody", {}, ...order.map((row) => el("tr", { class: "clickable", dataset: { label: row.label }, onclick: () => select(row.label) },
          el("td", { text: row.label }), el("td", { class: "num", text: fmtNum(row.min) }), el("td", { class: "num", text: fmtNum(row.mean) }),
          el("td", { class: "num", text: fmtNum(row.max) }), el("td", { class: "num", text: fmtNum(row.points) })))));
    }

    async function refresh() {
      const width = Math.max(50, Math.min(1000, Math.floor((canvas.clientWidth || 600))));
      data = await api(`/dashboard/runs/${encodeURIComponent(page.runId)}/heatmap`, { metric, kind, x: page.xAxis, width });
      if (!data.labels.length || !data.edges.length) {
        root.replaceChildren(el("p", { class: "empty", text: "no points yet" }));
        return;
      }
      draw();
      await Promise.all([top.refresh(), imbalance.refresh(), rowChart ? rowChart.refresh() : null]);
    }

    await refresh();
    return refresh;
  }

  function mostOften(labels) {
    const counts = new Map();
    for (const label of labels) if (label) counts.set(label, (counts.get(label) || 0) + 1);
    let best = null;
    for (const [label, n] of counts) if (!best || n > counts.get(best)) best = label;
    return best;
  }

  async function ranksTab(body, page) {
    const groups = page.view.groups;
    if (!page.xChosen) page.xAxis = "step";
    const options = [
      ...Object.keys(groups.per_process).map((m) => ({ value: `metric:${m}`, text: m })),
      ...Object.keys(groups.process_resources).map((m) => ({ value: `resource:${m}`, text: `resources: ${m}` })),
    ];
    if (!options.length) {
      body.append(el("p", { class: "empty", text: "No per-process metrics: this run has one process, or its ranks log under plain names (see docs/mpi.md)." }));
      return null;
    }
    page.rankChoice = page.rankChoice && options.some((o) => o.value === page.rankChoice) ? page.rankChoice : options[0].value;
    const select = el("select", { id: "rank-metric" }, ...options.map((o) => el("option", { value: o.value, text: o.text, selected: o.value === page.rankChoice })));
    const holder = el("div");
    let refresh = null;
    async function open() {
      charts.destroyAll();
      holder.replaceChildren();
      const [kind, ...rest] = page.rankChoice.split(":");
      refresh = await heatView(holder, page, rest.join(":"), kind);
    }
    select.addEventListener("change", () => { page.rankChoice = select.value; open(); });
    body.append(el("div", { class: "toolbar" }, el("label", {}, "metric ", select), xToolbar(page)), holder);
    await open();
    return () => (refresh ? refresh() : null);
  }

  async function resourcesTab(body, page) {
    const groups = page.view.groups;
    if (!page.xChosen) page.xAxis = "time"; // samples are numbered, not stepped: time reads better
    const refreshers = [];
    const perProcess = Object.keys(groups.process_resources);
    body.append(el("div", { class: "toolbar" }, xToolbar(page)));
    const processBox = el("div");
    const nodeBox = el("div");
    body.append(processBox, nodeBox);
    async function openTabAgain() {
      charts.destroyAll();
      processBox.replaceChildren();
      nodeBox.replaceChildren();
      refreshers.length = 0;
      if (perProcess.length) {
        const preferred = ["cpu.usage.percentage", "memory.usage", "gpu.memory.usage"].filter((m) => perProcess.includes(m));
        const choice = el("select", { id: "resource-metric" }, ...perProcess.map((m) => el("option", { value: m, text: m, selected: m === (page.resourceChoice || preferred[0]) })));
        const holder = el("div");
        processBox.append(el("h2", { text: "Per process" }), el("div", { class: "toolbar" }, el("label", {}, "resource ", choice)), holder);
        page.resourceChoice = choice.value;
        let refresh = await heatView(holder, page, choice.value, "resource");
        refreshers.push(() => refresh());
        choice.addEventListener("change", async () => {
          page.resourceChoice = choice.value;
          holder.replaceChildren();
          refresh = await heatView(holder, page, choice.value, "resource");
        });
      }
      const nodes = {};
      for (const [metric, hosts] of Object.entries(groups.node_resources)) for (const host of hosts) (nodes[host] = nodes[host] || []).push(metric);
      if (Object.keys(nodes).length) {
        nodeBox.append(el("h2", { text: "Per node" }));
        const grid = el("div", { class: "small-multiples" });
        nodeBox.append(grid);
        const all = [];
        for (const [host, metrics] of Object.entries(nodes)) {
          const card = el("div", { class: "panel" }, el("h3", { text: host }));
          grid.append(card);
          const families = [["CPU %", (m) => m === "cpu.usage.percentage"], ["memory (MB)", (m) => m === "memory.usage" || m === "memory.available"],
            ["GPU utilisation %", (m) => /^gpu\d+\.utilisation\.percentage$/.test(m)], ["GPU memory (MB)", (m) => /^gpu\d+\.memory\.usage$/.test(m)],
            ["load", (m) => m === "load.average"], ["network (MB/s)", (m) => m.startsWith("network.")]];
          for (const [title, test] of families) {
            const names = metrics.filter(test).sort();
            if (!names.length) continue;
            all.push(lineChart(card, { title, xLabel: page.xAxis, height: 140, markers: markersOf(page),
              fetch: linesOf(page, names.map((m) => `resources/node/${host}/${m}`), names) }));
          }
        }
        await Promise.all(all.map((chart) => chart.refresh()));
        refreshers.push(() => Promise.all(all.map((chart) => chart.refresh())));
      }
      if (groups.plain_resources.length) {
        const grid = el("div", { class: "charts" });
        nodeBox.append(el("h2", { text: "This process" }), grid);
        const all = groups.plain_resources.map((name) => lineChart(grid, { title: name.replace(/^resources\//, ""), xLabel: page.xAxis,
          markers: markersOf(page), fetch: linesOf(page, [name]) }));
        await Promise.all(all.map((chart) => chart.refresh()));
        refreshers.push(() => Promise.all(all.map((chart) => chart.refresh())));
      }
      if (!perProcess.length && !Object.keys(nodes).length && !groups.plain_resources.length) {
        processBox.append(el("p", { class: "empty", text: "No resource samples (resources_metrics_interval may be 0)." }));
      }
    }
    await openTabAgain();
    return () => Promise.all(refreshers.map((f) => f()));
  }

  async function eventsTab(body, page) {
    const levels = el("select", { id: "event-level" }, el("option", { value: "", text: "any level" }),
      ...["debug", "info", "warning", "error", "critical"].map((l) => el("option", { value: l, text: l })));
    const ranks = el("select", { id: "event-rank" }, el("option", { value: "", text: "any process" }));
    const search = el("input", { id: "event-search", placeholder: "message contains" });
    const table = el("table", { class: "events", id: "events" });
    const note = el("p", { class: "muted" });
    body.append(el("div", { class: "toolbar" }, el("label", {}, "level ", levels), el("label", {}, "process ", ranks), search),
      el("div", { class: "panel" }, table, note));
    let events = [];
    const LIMIT = 5000;

    function labelOf(message) { const match = /^\[([\w.-]+)\] /.exec(message); return match ? match[1] : "main"; }

    function render() {
      const shown = events.filter((e) => (!levels.value || e.log_level === levels.value)
        && (!ranks.value || labelOf(e.message) === ranks.value)
        && (!search.value || e.message.toLowerCase().includes(search.value.toLowerCase())));
      table.replaceChildren(el("thead", {}, el("tr", {}, el("th", { text: "Time" }), el("th", { text: "Level" }), el("th", { text: "Message" }))),
        el("tbody", {}, ...shown.map((e) => el("tr", {},
          el("td", { class: "time", text: fmtTime(e.timestamp) }),
          el("td", { class: `level level-${e.log_level}`, text: e.log_level }),
          el("td", { text: e.message })))));
      note.textContent = `${shown.length} of ${events.length} events` + (page.view.events > events.length ? ` (the first ${LIMIT} of ${page.view.events})` : "");
    }

    async function load() {
      events = (await api("/events", { run: page.runId, count: LIMIT })).data;
      const labels = [...new Set(events.map((e) => labelOf(e.message)))].sort();
      const current = ranks.value;
      ranks.replaceChildren(el("option", { value: "", text: "any process" }), ...labels.map((l) => el("option", { value: l, text: l, selected: l === current })));
      render();
    }
    for (const input of [levels, ranks, search]) input.addEventListener("input", render);
    await load();
    return load;
  }

  async function alertsTab(body, page) {
    const table = el("table", { id: "alerts" });
    body.append(el("div", { class: "panel" }, table));
    function render() {
      const alerts = page.view.run.alerts || [];
      if (!alerts.length) { table.replaceChildren(el("tbody", {}, el("tr", {}, el("td", { class: "empty", text: "This run has no alerts." })))); return; }
      table.replaceChildren(el("thead", {}, el("tr", {}, ...["Alert", "Rule", "State", "Fired at"].map((t) => el("th", { text: t })))),
        el("tbody", {}, ...alerts.map((a) => el("tr", {},
          el("td", { text: a.alert.name }),
          el("td", { text: describeRule(a.alert) }),
          el("td", {}, badge(a.status || "not set")),
          el("td", { text: fmtTime(a.fired_at) })))));
    }
    render();
    return async () => render();
  }

  function describeRule(alert) {
    const rule = alert.alert || {};
    if (alert.source === "metrics") return `${rule.metric} ${rule.rule || ""} ${rule.threshold ?? (rule.range_low !== undefined ? `[${rule.range_low}, ${rule.range_high}]` : "")} (${rule.aggregation || ""}, window ${rule.window ?? ""})`;
    if (alert.source === "events") return `event matches “${rule.pattern}”`;
    return alert.source || "user";
  }

  async function artifactsTab(body, page) {
    const table = el("table", { id: "artifacts" });
    body.append(el("div", { class: "panel" }, table));

    async function download(artifact) {
      // an artifact of the store itself: its content needs the token, so it is fetched here
      const response = await fetch(`/api/dashboard/runs/${encodeURIComponent(page.runId)}/artifacts/content?name=${encodeURIComponent(artifact.name)}`,
        { headers: { Authorization: `Bearer ${localStorage.getItem(TOKEN_KEY) || ""}` } });
      if (!response.ok) { alert(`Could not download ${artifact.name}: ${response.status}`); return; }
      const link = el("a", { href: URL.createObjectURL(await response.blob()), download: artifact.name.split("/").pop() });
      document.body.append(link);
      link.click();
      link.remove();
    }

    async function load() {
      const artifacts = await api(`/dashboard/runs/${encodeURIComponent(page.runId)}/artifacts`);
      if (!artifacts.length) { table.replaceChildren(el("tbody", {}, el("tr", {}, el("td", { class: "empty", text: "This run has no artifacts." })))); return; }
      table.replaceChildren(el("thead", {}, el("tr", {}, ...["Name", "Category", "Size", "Type", "Created"].map((t) => el("th", { text: t })))),
        el("tbody", {}, ...artifacts.map((a) => el("tr", {},
          el("td", {}, a.url ? el("a", { href: a.url, download: a.name.split("/").pop(), text: a.name })
            : el("a", { href: "#", text: a.name, onclick: (event) => { event.preventDefault(); download(a); } })),
          el("td", { text: a.category }), el("td", { class: "num", text: fmtBytes(a.size) }),
          el("td", { text: a.mime_type || "" }), el("td", { text: fmtTime(a.created) })))));
    }
    await load();
    return load;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  async function metadataTab(body, page) {
    function render() {
      const run = page.view.run;
      const metadata = { ...(run.metadata || {}) };
      const simvue = metadata.simvue || {};
      delete metadata.simvue;
      const processes = Object.entries(page.view.processes).sort(([a], [b]) => a.localeCompare(b, undefined, { numeric: true }));
      const hosts = Object.entries(simvue.hosts || {});
      const factKeys = [...new Set(hosts.flatMap(([, facts]) => Object.keys(facts || {})))];
      body.replaceChildren(...[
        el("div", { class: "panel" }, el("h3", { text: "Run" }), el("table", {}, el("tbody", {},
          ...[["id", run.id], ["folder", run.folder], ["description", run.description || ""], ["tags", (run.tags || []).join(", ")],
            ["created", fmtTime(run.created)], ["started", fmtTime(run.started)], ["ended", fmtTime(run.endtime)]]
            .map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v })))))),
        el("div", { class: "panel" }, el("h3", { text: "Metadata" }), el("pre", { class: "json", id: "metadata", text: JSON.stringify(metadata, null, 2) })),
        el("div", { class: "panel" }, el("h3", { text: "Processes" }), el("table", { id: "processes" },
          el("thead", {}, el("tr", {}, ...["Process", "pid", "host", "role", "state"].map((t) => el("th", { text: t })))),
          el("tbody", {}, ...processes.map(([label, p]) => el("tr", {}, el("td", { text: label }), el("td", { text: p.pid ?? "" }),
            el("td", { text: p.host ?? "" }), el("td", { text: p.role ?? "" }), el("td", { text: p.state ?? "" })))))),
        hosts.length ? el("div", { class: "panel" }, el("h3", { text: "Hosts" }), el("table", { id: "hosts" },
          el("thead", {}, el("tr", {}, el("th", { text: "host" }), ...factKeys.map((k) => el("th", { text: k })))),
          el("tbody", {}, ...hosts.map(([host, facts]) => el("tr", {}, el("td", { text: host }),
            ...factKeys.map((k) => el("td", { text: typeof (facts || {})[k] === "object" ? JSON.stringify(facts[k]) : (facts || {})[k] ?? "" }))))))) : null,
        Object.keys(simvue).filter((k) => !["hosts", "processes"].includes(k)).length
          ? el("div", { class: "panel" }, el("h3", { text: "Tracking" }), el("pre", { class: "json",
            text: JSON.stringify(Object.fromEntries(Object.entries(simvue).filter(([k]) => !["hosts", "processes"].includes(k))), null, 2) })) : null,
      ].filter(Boolean));
    }
    render();
    return async () => render();
  }

  // -- start ----------------------------------------------------------------------------------

  takeTokenFromUrl();
  setupLiveControls();
  route();
})();
