"""The fixed parts of ``flowctl report``'s page (flowd/report.py): its CSS and script.

The script reads the trace from the JSON element ``trace-data`` and draws the
timeline and the per-process plots as SVG. It writes strings into the page
with ``textContent`` and attribute values only (never HTML). When it is done it
adds ``<div id="report-ready" data-bars=N data-ms=T>`` (N bars drawn, T ms
spent); a script error adds ``<div id="script-error">`` (``window.onerror``).
"""

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:.6em 0 .3em}
.made{color:#666;margin-top:.2em}
table.summary th{text-align:left;padding:2px 1em 2px 0;color:#555;font-weight:normal}
.scroll{overflow:auto;max-height:640px;border:1px solid #eee}
.graph text{font:12px system-ui,Helvetica,Arial,sans-serif}
#timeline text,.plots text{font:11px system-ui,Helvetica,Arial,sans-serif;fill:#333}
.legend .key{display:inline-block;width:1.2em;height:.8em;margin:0 .3em 0 1em;vertical-align:middle}
.key.wait{background:#c9ced6}.key.ok{background:#3c9a5f}.key.bad{background:#d03b3b}
.key.other{background:#8a8f98}
.plots{display:flex;flex-wrap:wrap;gap:2em}
#tip{position:fixed;display:none;background:#fff;border:1px solid #888;padding:4px 6px;
font-size:12px;white-space:pre;pointer-events:none;max-width:60em;overflow:hidden}
.failure{border-left:4px solid #d03b3b;padding-left:.8em;margin:1em 0}
.failure .reason{white-space:pre-wrap;word-break:break-word}
pre.tail{background:#f6f6f6;padding:.5em;max-height:20em;overflow:auto;white-space:pre-wrap;
word-break:break-word}
.state.succeeded{color:#3c9a5f}.state.failed,.state.oom,.state.timeout{color:#d03b3b}
.none{color:#666}
.script-error{background:#d03b3b;color:#fff;padding:.5em}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var t0 = performance.now();
  var NS = "http://www.w3.org/2000/svg";
  var raw = JSON.parse(document.getElementById("trace-data").textContent);
  var K = {};
  raw.keys.forEach(function (k, i) { K[k] = i; });
  var rows = raw.rows;
  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var a in attrs) { e.setAttribute(a, attrs[a]); }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }
  function size(n) {
    if (n === null) { return "-"; }
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }
  function secs(s) { return s === null ? "-" : s.toFixed(2) + " s"; }
  var FAILED = {failed: 1, oom: 1, timeout: 1, damaged: 1};

  // -- the timeline: one bar per attempt, packed into lanes -------------------
  var items = [], t_min = Infinity, t_max = -Infinity;
  rows.forEach(function (r, i) {
    var q = num(r[K.queued_at]), s = num(r[K.started_at]), f = num(r[K.finished_at]);
    var a = q !== null ? q : (s !== null ? s : f);
    if (a === null) { a = 0; }
    if (f === null) { f = s !== null ? s : a; }
    if (s === null) { s = f; }
    items.push({i: i, a: a, s: s, f: f});
    t_min = Math.min(t_min, a); t_max = Math.max(t_max, f);
  });
  items.sort(function (x, y) { return x.a - y.a || x.i - y.i; });
  var lanes = [];
  items.forEach(function (it) {
    var lane = -1;
    for (var j = 0; j < lanes.length; j++) { if (lanes[j] <= it.a) { lane = j; break; } }
    if (lane < 0) { lane = lanes.length; lanes.push(0); }
    lanes[lane] = it.f + 1e-9;
    it.lane = lane;
  });
  var span = Math.max(t_max - t_min, 1e-3);
  var W = 1100, L = 60, laneH = Math.max(3, Math.min(16, Math.floor(560 / Math.max(lanes.length, 1))));
  var H = 30 + lanes.length * laneH + 10;
  var svg = document.getElementById("timeline");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  var x = function (t) { return L + (t - t_min) / span * (W - L - 10); };
  for (var k = 0; k <= 5; k++) {
    var tx = L + k * (W - L - 10) / 5;
    el("line", {x1: tx, x2: tx, y1: 18, y2: H - 5, stroke: "#eee"}, svg);
    var lab = el("text", {x: tx, y: 12, "text-anchor": k === 5 ? "end" : "middle"}, svg);
    lab.textContent = "+" + secs(span * k / 5);
  }
  var frag = document.createDocumentFragment();
  items.forEach(function (it) {
    var r = rows[it.i], st = r[K.state], y = 24 + it.lane * laneH, h = Math.max(laneH - 1, 2);
    var g = el("g", {"class": "bar " + (FAILED[st] ? "fail" : st === "succeeded" ? "ok" : "other"),
                     "data-i": it.i}, frag);
    var xa = x(it.a), xs = x(it.s), xf = x(it.f);
    if (xs - xa > 0.2) { el("rect", {x: xa, y: y, width: xs - xa, height: h, fill: "#c9ced6"}, g); }
    el("rect", {x: xs, y: y, width: Math.max(xf - xs, 1), height: h,
                fill: FAILED[st] ? "#d03b3b" : st === "succeeded" ? "#3c9a5f" : "#8a8f98"}, g);
    if (FAILED[st]) { el("rect", {x: xf - 1, y: y - 1, width: 3, height: h + 2, fill: "#600"}, g); }
  });
  svg.appendChild(frag);
  var tip = document.getElementById("tip");
  svg.addEventListener("mousemove", function (ev) {
    var g = ev.target.parentNode;
    if (!g || !g.getAttribute || g.getAttribute("data-i") === null) { tip.style.display = "none"; return; }
    var r = rows[+g.getAttribute("data-i")];
    var q = num(r[K.queued_at]), s = num(r[K.started_at]), f = num(r[K.finished_at]);
    tip.textContent = r[K.process] + " task " + r[K.task] + " attempt " + r[K.attempt] + ": " +
      r[K.state] + (r[K.exit_status] !== null ? " (exit " + r[K.exit_status] + ")" : "") +
      "\nwait " + secs(q !== null && s !== null ? s - q : null) +
      ", run " + secs(s !== null && f !== null ? f - s : null) +
      "\npeak memory " + size(num(r[K.peak_memory])) + ", cpu " + secs(num(r[K.cpu_seconds])) +
      "\n" + (r[K.started_how] || "") + " on " + (r[K.node] || "?") +
      (r[K.reason] && r[K.state] !== "succeeded" ? "\n" + String(r[K.reason]).slice(0, 300) : "");
    tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px";
    tip.style.display = "block";
  });
  svg.addEventListener("mouseleave", function () { tip.style.display = "none"; });

  // -- per process: total run seconds, highest peak memory --------------------
  var procs = {}, order = [];
  rows.forEach(function (r) {
    var p = String(r[K.process]);
    if (!procs[p]) { procs[p] = {run: 0, mem: null, n: 0}; order.push(p); }
    var s = num(r[K.started_at]), f = num(r[K.finished_at]), m = num(r[K.peak_memory]);
    if (s !== null && f !== null) { procs[p].run += f - s; }
    if (m !== null) { procs[p].mem = Math.max(procs[p].mem || 0, m); }
    procs[p].n++;
  });
  function plot(id, value, label) {
    var svg = document.getElementById(id), bh = 18, LW = 150, PW = 260;
    var max = 0;
    order.forEach(function (p) { max = Math.max(max, value(procs[p]) || 0); });
    svg.setAttribute("width", LW + PW + 170); svg.setAttribute("height", order.length * (bh + 4) + 4);
    order.forEach(function (p, i) {
      var v = value(procs[p]), y = 2 + i * (bh + 4);
      var t = el("text", {x: LW - 6, y: y + 13, "text-anchor": "end"}, svg);
      t.textContent = p.length > 22 ? p.slice(0, 21) + "\u2026" : p;
      el("rect", {"class": "pbar", x: LW, y: y, height: bh, fill: "#3a6ea5",
                  width: v && max ? Math.max(v / max * PW, 1) : 0}, svg);
      var vt = el("text", {x: LW + (v && max ? v / max * PW : 0) + 4, y: y + 13}, svg);
      vt.textContent = label(v, procs[p]);
    });
  }
  plot("plot-time", function (p) { return p.run; },
       function (v, p) { return secs(v) + " (" + p.n + " attempts)"; });
  plot("plot-mem", function (p) { return p.mem; }, function (v) { return size(v); });

  var done = document.createElement("div");
  done.id = "report-ready";
  done.setAttribute("data-bars", svg.querySelectorAll("g.bar").length);
  done.setAttribute("data-ms", Math.round(performance.now() - t0));
  done.hidden = true;
  document.body.appendChild(done);
})();
"""
