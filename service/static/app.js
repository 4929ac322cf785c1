// lipcert's web page: plain JavaScript, no library, no build step.
// It only calls the service's own JSON API (POST predict, POST models, GET examples), with
// relative URLs, so it works behind a path prefix and offline.
"use strict";

(function () {
  const ALL = "__all__";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22"];
  const $ = (id) => document.getElementById(id);
  const state = {
    models: [],          // /models "models"
    byName: {},
    defaultModel: null,
    file: null,          // the Blob to upload
    fileName: "",
    results: [],         // [{pred, info, latency}] of the last run
    run: 0,              // increments per prediction run: stale answers are dropped
    loaded: false,       // /models answered (or failed): predictions wait for it
    listed: false,       // /models answered
  };

  // ------------------------------------------------------------------ messages

  function showMessage(text, kind) {
    const box = document.createElement("div");
    box.className = "message " + (kind || "error");
    box.setAttribute("role", kind === "info" ? "status" : "alert");
    const span = document.createElement("span");
    span.textContent = text;
    const close = document.createElement("button");
    close.type = "button";
    close.className = "close";
    close.setAttribute("aria-label", "dismiss");
    close.textContent = "×";
    close.addEventListener("click", () => box.remove());
    box.append(span, close);
    $("messages").append(box);
  }

  function clearMessages() {
    $("messages").replaceChildren();
  }

  window.addEventListener("error", (e) => showMessage("page error: " + e.message));
  window.addEventListener("unhandledrejection", (e) => {
    const reason = e.reason;
    showMessage(reason && reason.message ? reason.message : String(reason));
  });

  // ------------------------------------------------------------------ API

  // fetch + JSON, every failure turned into an Error with a readable one-line message
  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new Error("cannot reach the service (" + path + "): " + err.message);
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && body.error ? body.error
        : (text.trim().slice(0, 300) || response.statusText);
      throw new Error("/" + path + " answered " + response.status + ": " + detail);
    }
    if (body === null) {
      throw new Error("/" + path + " answered something that is not JSON");
    }
    return body;
  }

  // ------------------------------------------------------------------ formatting

  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1));
  const ms = (v) => (v === null || v === undefined ? "–" : v.toFixed(2));
  const mib = (v) => (v / 2 ** 20).toFixed(1);

  // "36/255" where k/255 is (nearly) an integer, else the decimal
  function epsLabel(eps) {
    const k = eps * 255;
    if (eps > 0 && Math.abs(k - Math.round(k)) < 0.02 && Math.round(k) !== 255) {
      return Math.round(k) + "/255";
    }
    return String(+eps.toFixed(4));
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function inputPixels(info) {
    return info ? info.input_shape.reduce((a, b) => a * b, 1) : null;
  }

  function shapeText(info) {
    const [c, h, w] = info.input_shape;
    return h + "×" + w + (c === 1 ? " gray" : " × " + c + " channels");
  }

  // what an L2 radius r ([0,1] pixels) means in 0–255 grey levels for an image of n values
  function greyLevels(r, n) {
    const levels = r * 255;
    let text = "= " + levels.toFixed(1) + " grey levels (of 255) on a single pixel";
    if (n) {
      text += ", or " + (levels / Math.sqrt(n)).toFixed(2) + " on each of the " + n + " values";
    }
    return text;
  }

  function currentEps() {
    return Number($("eps").value) / 255;
  }

  function selectedInfo() {
    const name = $("model").value;
    return state.byName[name] || state.byName[state.defaultModel] || state.models[0] || null;
  }

  // ------------------------------------------------------------------ ε slider

  function renderEpsText() {
    const k = Number($("eps").value);
    const eps = k / 255;
    const info = selectedInfo();
    const n = inputPixels(info);
    const box = $("eps-text");
    box.replaceChildren(
      el("strong", {}, "ε = " + k + "/255 = " + eps.toFixed(4)),
      " (L2, [0, 1] pixels). ",
      "In 0–255 grey levels: changing one pixel by " + k + " levels" +
        (n ? ", or every one of the " + n + " input values (" + shapeText(info) + ") by " +
          (k / Math.sqrt(n)).toFixed(2) + " levels" : "") +
        ", or any change of the same L2 norm. The paper's ε: 36/255, 72/255, 108/255.",
    );
    for (const card of document.querySelectorAll(".result[data-radius]")) {
      updateCertified(card, eps);
    }
  }

  function updateCertified(card, eps) {
    const r = Number(card.dataset.radius);
    const badge = card.querySelector(".certified");
    const yes = r > eps;  // strict, as /certify
    badge.className = "certified " + (yes ? "yes" : "no");
    badge.textContent = (yes ? "✔ certified" : "✘ not certified") + " at ε = " + epsLabel(eps) +
      (yes ? " (radius " + r.toFixed(4) + " > " + eps.toFixed(4) + ")"
        : " (radius " + r.toFixed(4) + " ≤ " + eps.toFixed(4) + ")");
  }

  // ------------------------------------------------------------------ one prediction card

  function topK(pred, info, k) {
    const order = pred.scores.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0]).slice(0, k);
    const max = order[0][0];
    const min = Math.min(...pred.scores);
    const span = max - min || 1;
    const rows = order.map(([score, i]) => {
      const name = info && info.classes[i] !== undefined ? info.classes[i] : String(i);
      const bar = el("div", { class: "bar" });
      bar.style.width = (100 * (score - min) / span).toFixed(1) + "%";
      return el("tr", { class: i === pred.label ? "top" : null },
        el("td", { class: "cls" }, name),
        el("td", { class: "barcell" }, bar),
        el("td", { class: "num" }, score.toFixed(4)));
    });
    return el("table", { class: "scores" },
      el("caption", {}, "top-" + order.length + " scores (logits)"), ...rows);
  }

  function renderCard(pred, info, latency) {
    const n = inputPixels(info);
    const r = pred.certified_radius;
    const card = el("article", {
      class: "result", "data-model": pred.model, "data-radius": String(r),
      "data-label": String(pred.label),
    });
    card.append(el("h3", {}, pred.model, " ",
      el("span", { class: "badge" }, pred.method),
      info ? el("span", { class: "badge light" }, info.dataset + ", " + shapeText(info)) : null));

    card.append(el("p", { class: "prediction" }, "Predicted: ",
      el("strong", { class: "label", "data-label": String(pred.label) }, pred.class_name),
      " (class " + pred.label + ", margin " + pred.margin.toFixed(4) + ")"));

    const radius = el("div", { class: "radius-box" });
    radius.append(el("div", {},
      "Certified radius ",
      el("span", { class: "radius", "data-radius": String(r) }, r.toFixed(4)),
      " in the model input's [0, 1] pixels ",
      el("span", { class: "muted" }, greyLevels(r, n))));
    const ru = pred.certified_radius_uploaded;
    const steps = pred.preprocessing.length ? pred.preprocessing.join(", ") : "none";
    if (ru !== null && ru !== undefined) {
      radius.append(el("div", {},
        "In your image's own [0, 1] pixels: ",
        el("span", { class: "radius-uploaded", "data-radius-uploaded": String(ru) },
          ru.toFixed(4)),
        el("span", { class: "muted" }, " " + greyLevels(ru, null) + "; preprocessing: " + steps)));
    } else {
      radius.append(el("div", { class: "muted radius-uploaded-none" },
        "In your image's own pixels: not defined for this preprocessing (" + steps +
        "): only linear maps with a known norm carry the radius back."));
    }
    if (r <= 0) {
      radius.append(el("div", { class: "muted" },
        "Radius 0: the prediction is not certified at any ε (a tie, or a margin below the " +
        "floating-point slack)."));
    }
    card.append(radius);
    card.append(el("p", {}, el("span", { class: "certified" })));
    card.append(topK(pred, info, Number($("topk").value)));

    const bound = info && info.lipschitz_bound !== pred.lipschitz_bound
      ? " (whole network " + info.lipschitz_bound.toFixed(4) + ")" : "";
    card.append(el("dl", { class: "meta" },
      el("dt", {}, "method"), el("dd", {}, pred.method + (info ? " " + info.size : "")),
      el("dt", {}, "certificate"), el("dd", {}, pred.certificate),
      el("dt", {}, "audited bound"),
      el("dd", { class: "bound" }, pred.lipschitz_bound.toFixed(4) + bound),
      el("dt", {}, "latency"),
      el("dd", { class: "latency" }, latency.toFixed(1) + " ms request, " +
        ms(pred.inference_ms) + " ms ONNX Runtime")));
    updateCertified(card, currentEps());
    return card;
  }

  function renderError(name, err) {
    return el("article", { class: "result failed", "data-model": name },
      el("h3", {}, name), el("p", { class: "message error" }, err.message));
  }

  // ------------------------------------------------------------------ predicting

  async function predict() {
    if (!state.file || !state.loaded) return;
    if (state.listed && !state.models.length) {
      $("results").replaceChildren(el("p", { class: "message error" },
        "No model is being served, so nothing can predict. The Models view lists the refused " +
        "ones and why; the server log has the details."));
      $("results-empty").hidden = true;
      return;
    }
    const run = ++state.run;
    // /models failed: ask for the default model anyway, the service's answer says what is wrong
    const chosen = $("model").value === ALL ? state.models.map((m) => m.name)
      : [$("model").value || state.defaultModel || ""];
    const results = $("results");
    results.replaceChildren(el("p", { class: "muted" }, "asking " + chosen.length +
      (chosen.length === 1 ? " model…" : " models…")));
    $("results-empty").hidden = true;
    $("run").disabled = true;
    const cards = [];
    try {
      // one after another, so each request's latency is its own
      for (const name of chosen) {
        const form = new FormData();
        form.append("image", state.file, state.fileName || "image.png");
        if (name) form.append("model", name);
        const t0 = performance.now();
        try {
          const pred = await api("predict", { method: "POST", body: form });
          cards.push(renderCard(pred, state.byName[pred.model], performance.now() - t0));
        } catch (err) {
          cards.push(renderError(name || "default model", err));
          showMessage((name || "default model") + ": " + err.message);
        }
        if (run !== state.run) return;  // a newer image was picked meanwhile
      }
      results.replaceChildren(...cards);
    } finally {
      if (run === state.run) $("run").disabled = false;
    }
  }

  function setFile(blob, name, caption) {
    if (!blob.type.startsWith("image/") && blob.type !== "") {
      showMessage(name + " is not an image (" + blob.type + "); the service will refuse it", "info");
    }
    state.file = blob;
    state.fileName = name;
    const preview = $("preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.onload = () => {
      $("preview-caption").textContent = name + ": " + preview.naturalWidth + "×" +
        preview.naturalHeight + " pixels, " + blob.size + " bytes" + (caption ? " · " + caption : "");
    };
    preview.onerror = () => {
      $("preview-caption").textContent = name + ": the browser cannot show it";
    };
    preview.src = URL.createObjectURL(blob);
    $("preview-box").hidden = false;
    $("run").disabled = false;
    predict();
  }

  // ------------------------------------------------------------------ inputs

  function setupInputs() {
    $("file").addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (file) setFile(file, file.name, "uploaded");
      e.target.value = "";  // so that choosing the same file again is a change too
    });
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer.files[0];
      if (file) setFile(file, file.name, "dropped");
      else showMessage("the drop held no file");
    });
    $("eps").addEventListener("input", renderEpsText);
    $("model").addEventListener("change", () => {
      renderEpsText();
      predict();
    });
    $("topk").addEventListener("change", () => predict());
    $("run").addEventListener("click", () => predict());
  }

  async function loadExamples() {
    const box = $("examples");
    let listed;
    try {
      listed = (await api("examples")).examples;
    } catch (err) {
      box.replaceChildren(el("span", { class: "muted" }, "no examples: " + err.message));
      return;
    }
    if (!listed.length) {
      box.replaceChildren(el("span", { class: "muted" },
        "no example images ship with this installation (LIPCERT_EXAMPLES, examples/)"));
      return;
    }
    box.replaceChildren(...listed.map((item) => {
      const label = item.label ? item.label : "photo";
      const button = el("button", {
        type: "button", class: "example", "data-file": item.file,
        title: item.file + " (" + item.size + "): " + item.source,
      }, el("img", { src: item.url, alt: label }), el("span", {}, label));
      button.addEventListener("click", async () => {
        try {
          const response = await fetch(item.url);
          if (!response.ok) throw new Error(item.url + " answered " + response.status);
          setFile(await response.blob(), item.file,
            "example, true label: " + (item.label || "none") + " (" + item.dataset + ")");
        } catch (err) {
          showMessage("cannot load the example: " + err.message);
        }
      });
      return button;
    }));
  }

  // ------------------------------------------------------------------ models view

  function epsKeys() {
    const keys = new Set();
    for (const m of state.models) Object.keys(m.certified_accuracy).forEach((k) => keys.add(k));
    return [...keys].sort((a, b) => Number(a) - Number(b));
  }

  function renderModelsTable(body) {
    const keys = epsKeys();
    const head = ["model", "method", "size", "dataset", "certificate", "clean",
      ...keys.map((k) => "CRA " + epsLabel(Number(k))), "audited bound", "parameters",
      "b1 p50/p95", "b64 p50/p95", "MiB", "provider"];
    const table = $("models-table");
    table.replaceChildren(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))));
    const tbody = el("tbody");
    for (const m of state.models) {
      const lat = (b) => (m.latency[b] ? ms(m.latency[b].p50_ms) + " / " + ms(m.latency[b].p95_ms)
        : "–");
      const batches = Object.keys(m.latency).sort((a, b) =>
        Number(a.split("_")[1]) - Number(b.split("_")[1]));
      tbody.append(el("tr", { "data-model": m.name },
        el("td", {}, m.name + (m.default ? " ★" : "")), el("td", {}, m.method),
        el("td", {}, m.size), el("td", {}, m.dataset), el("td", {}, m.certificate),
        el("td", { class: "num" }, pct(m.clean_accuracy)),
        ...keys.map((k) => el("td", { class: "num" }, pct(m.certified_accuracy[k]))),
        el("td", { class: "num" }, m.lipschitz_bound.toFixed(4)),
        el("td", { class: "num" }, m.parameters.toLocaleString("en")),
        el("td", { class: "num" }, lat(batches[0] || "batch_1")),
        el("td", { class: "num" }, lat(batches[1] || "batch_64")),
        el("td", { class: "num" }, mib(m.session_memory_bytes)),
        el("td", {}, m.provider.replace("ExecutionProvider", ""))));
    }
    table.append(tbody);
    $("models-note").textContent = "★ the default model (best CRA at 36/255). Clean and " +
      "certified robust accuracy (CRA) in %, as recorded when the model was trained (its " +
      "report). b1, b64: ONNX Runtime latency alone in ms, p50/p95, measured at load at batch 1 " +
      "and at the batching size. MiB: the resident memory its session added; the whole " +
      "process holds " + mib(body.process_rss_bytes) + " MiB.";
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // CRA (%) against ε, one line per model; ε = 0 is the clean accuracy
  function renderPlot() {
    const box = $("cra-plot");
    const keys = epsKeys();
    const series = state.models.map((m) => {
      const pts = [];
      if (m.clean_accuracy !== null) pts.push([0, m.clean_accuracy]);
      for (const k of keys) {
        if (m.certified_accuracy[k] !== undefined) pts.push([Number(k), m.certified_accuracy[k]]);
      }
      return { name: m.name, pts };
    }).filter((s) => s.pts.length);
    if (!series.length) {
      box.replaceChildren(el("p", { class: "muted" },
        "no accuracy is recorded in these models' metadata, so there is nothing to plot"));
      return;
    }
    const W = 640, H = 320, L = 52, R = 16, T = 14, B = 46;
    const xmax = Math.max(...keys.map(Number), 36 / 255);
    const x = (e) => L + (W - L - R) * e / xmax;
    const y = (a) => T + (H - T - B) * (1 - a);
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "certified robust accuracy against epsilon", class: "cra-svg" });
    for (let a = 0; a <= 1.0001; a += 0.2) {
      root.append(svg("line", { x1: L, x2: W - R, y1: y(a), y2: y(a), class: "grid" }));
      root.append(svg("text", { x: L - 6, y: y(a) + 4, "text-anchor": "end" },
        (100 * a).toFixed(0) + "%"));
    }
    for (const e of [0, ...keys.map(Number)]) {
      root.append(svg("line", { x1: x(e), x2: x(e), y1: T, y2: H - B, class: "grid" }));
      root.append(svg("text", { x: x(e), y: H - B + 16, "text-anchor": "middle" },
        e === 0 ? "0" : epsLabel(e)));
    }
    root.append(svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" },
      "ε (L2, [0,1] pixels); at 0 the clean accuracy"));
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      root.append(svg("polyline", {
        points: s.pts.map(([e, a]) => x(e).toFixed(1) + "," + y(a).toFixed(1)).join(" "),
        fill: "none", stroke: color, "stroke-width": 2, "data-model": s.name,
      }));
      for (const [e, a] of s.pts) {
        const dot = svg("circle", { cx: x(e), cy: y(a), r: 3.5, fill: color });
        dot.append(svg("title", {}, s.name + ": " + pct(a) + " % at ε = " +
          (e === 0 ? "0 (clean)" : epsLabel(e))));
        root.append(dot);
      }
      const ly = T + 6 + 16 * i;
      root.append(svg("rect", { x: W - R - 180, y: ly - 9, width: 12, height: 12, fill: color }));
      root.append(svg("text", { x: W - R - 162, y: ly + 1 }, s.name));
    });
    box.replaceChildren(root);
  }

  function renderRefused(body) {
    const box = $("refused");
    if (!body.refused.length) {
      box.replaceChildren();
      return;
    }
    box.replaceChildren(el("h2", {}, "Refused models"),
      el("p", { class: "muted" }, "Found but not served: each failed a check at load."),
      el("ul", {}, ...body.refused.map((r) => el("li", {}, el("code", {}, r.source), ": " +
        r.reason))));
  }

  async function loadModels() {
    let body;
    state.loaded = state.listed = false;
    try {
      body = await api("models", {
        method: "POST", headers: { "content-type": "application/json" }, body: "{}",
      });
    } catch (err) {
      $("model").replaceChildren(el("option", { value: "" }, "no model"));
      showMessage("cannot list the models: " + err.message);
      state.loaded = true;
      return;
    }
    state.models = body.models;
    state.byName = Object.fromEntries(body.models.map((m) => [m.name, m]));
    state.defaultModel = body.default_model;
    state.loaded = state.listed = true;
    const select = $("model");
    if (!body.models.length) {
      select.replaceChildren(el("option", { value: "" }, "no model is served"));
      showMessage("the service serves no model" + (body.refused.length
        ? ": " + body.refused.length + " refused (see Models)" : "") + "; see the server log");
    } else {
      select.replaceChildren(
        ...body.models.map((m) => el("option", { value: m.name },
          m.name + " (" + m.method + ", " + m.dataset + ")" + (m.default ? " ★" : ""))),
        el("option", { value: ALL }, "all models (" + body.models.length + ")"));
      select.value = body.default_model || body.models[0].name;
    }
    renderModelsTable(body);
    renderPlot();
    renderRefused(body);
    renderEpsText();
  }

  // ------------------------------------------------------------------ views

  function route() {
    const models = location.hash === "#models";
    $("predict-view").hidden = models;
    $("models-view").hidden = !models;
    $("nav-predict").classList.toggle("active", !models);
    $("nav-models").classList.toggle("active", models);
  }

  async function main() {
    window.addEventListener("hashchange", route);
    route();
    setupInputs();
    renderEpsText();
    await Promise.all([loadModels(), loadExamples()]);
    document.body.dataset.ready = "1";
    if (state.file) predict();
  }

  main().catch((err) => showMessage("the page failed to start: " + err.message));
  window.lipcert = { state, clearMessages };
})();
