/* HybridCN-NAS web diagnostic page: plain JavaScript, no framework, no build step.
 * Talks only to the gateway that served it (relative URLs): readyz, v1/classify, v1/jobs. */
"use strict";

(function () {
  const CONCURRENCY = 3;
  const READY_RETRY_MS = 3000;
  const READY_RECHECK_MS = 30000;
  const JOBS_POLL_MS = 2000;
  const JOBS_IDLE_MS = 15000;
  const DEFAULT_OPACITY = 55;

  /* API keys: a gateway with keys answers 401 to /v1/ calls without one; the page asks once per tab. */
  const KEY_STORE = "hybridcn-api-key";
  async function apiFetch(url, options = {}) {
    const attempt = () => {
      const key = sessionStorage.getItem(KEY_STORE);
      const headers = { ...(options.headers || {}), ...(key ? { "X-API-Key": key } : {}) };
      return fetch(url, { ...options, headers });
    };
    let response = await attempt();
    if (response.status === 401) {
      const key = window.prompt("This analysis server needs an API key. Enter the key you were given:");
      if (key) {
        sessionStorage.setItem(KEY_STORE, key.trim());
        response = await attempt();
      }
    }
    return response;
  }

  /* Class names come from the served model's manifest (GET v1/model), never from this file. */
  const CLASS_NAMES = {};

  async function loadModel() {
    try {
      const response = await apiFetch("v1/model", { cache: "no-store", headers: { Accept: "application/json" } });
      if (!response.ok) return false;
      const model = await response.json();
      for (const [label, name] of Object.entries(model.class_descriptions || {})) CLASS_NAMES[label] = { name };
      return true;
    } catch (error) {
      return false;
    }
  }

  /* The API's error codes in plain words; the server's detail is shown under them. */
  const ERROR_TEXT = {
    not_an_image: "This file is not an image the server can read. Send a JPEG, PNG, TIFF or BMP picture of one smear field.",
    unsupported_format: "This image format is not supported. Save the field as JPEG, PNG, TIFF or BMP.",
    unsupported_mode: "The colour mode of this image is not supported. Save it as an ordinary RGB JPEG or PNG.",
    too_many_pixels: "The image has too many pixels for one field. Crop it to a single field, or run the whole slide as a batch job.",
    too_large: "The file is too large to upload.",
    truncated: "The image file is damaged or incomplete. Export or copy it again and retry.",
    empty: "The file is empty.",
    too_small: "The image is too small to analyse. A field must be at least a few dozen pixels on each side.",
    bad_aspect_ratio: "The image is too long and narrow to be one field. Whole slides or strips need a batch job, which tiles them.",
    inference_unavailable: "The analysis server is not available right now. Try again in a moment.",
    no_file: "No file reached the server. Choose the file again.",
    no_files: "No files reached the server. Choose the files again.",
    bad_slide_id: "The slide ID may use letters, digits, spaces, '.', '_' and '-', and must start with a letter or digit.",
    network: "The server could not be reached. Check the connection, then retry.",
    bad_response: "The server sent an answer this page cannot read.",
  };
  const RETRYABLE = new Set(["inference_unavailable", "network", "bad_response", "http_500", "http_502", "http_503", "http_504"]);

  const $ = (id) => document.getElementById(id);

  /* Element builder: h("p", {class: "x"}, "text", child). Text is always set as text, never as HTML. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const pct = (p, digits = 1) => `${(100 * p).toFixed(digits)}%`;
  const bytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(0)} KB` : `${(n / 1048576).toFixed(1)} MB`);
  const className = (label) => (CLASS_NAMES[label] || { name: label, sub: "" }).name;

  /* ---------------------------------------------------------------- announcements */
  function announce(text) {
    const region = $("announcer");
    region.append(h("p", { text }));
    while (region.childElementCount > 6) region.firstElementChild.remove();
  }

  /* ---------------------------------------------------------------- readiness */
  const readiness = { ready: false, checked: false, waiters: [], timer: null, maxUploadBytes: null };

  function whenReady() {
    if (readiness.ready) return Promise.resolve();
    return new Promise((resolve) => readiness.waiters.push(resolve));
  }

  function setReady(ready, body, reason) {
    const wasReady = readiness.ready;
    readiness.ready = ready;
    readiness.checked = true;
    const status = $("server-status");
    status.dataset.state = ready ? "ready" : "down";
    const version = body && body.model_version ? ` · model ${body.model_version}` : "";
    if (body && Number.isFinite(body.max_upload_bytes)) readiness.maxUploadBytes = body.max_upload_bytes;
    $("server-status-text").textContent = ready ? `Ready${version}` : `Not ready${version}`;
    $("ready-banner").hidden = ready;
    if (!ready) {
      $("ready-banner-text").textContent = (reason === "unreachable"
        ? "The server cannot be reached. "
        : "The inference server is starting or temporarily unavailable. ")
        + "This page checks again every few seconds; files you add now wait until it is ready.";
    }
    if (ready) {
      if (!wasReady && readiness.waiters.length) announce("The analysis server is ready.");
      readiness.waiters.splice(0).forEach((resolve) => resolve());
    }
  }

  async function checkReady() {
    clearTimeout(readiness.timer);
    let ok = false;
    try {
      const response = await fetch("readyz", { cache: "no-store", headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => null);
      ok = response.ok;
      if (ok && !Object.keys(CLASS_NAMES).length) await loadModel();
      setReady(ok, body, ok ? null : "starting");
    } catch (error) {
      setReady(false, null, "unreachable");
    }
    readiness.timer = setTimeout(checkReady, ok ? READY_RECHECK_MS : READY_RETRY_MS);
  }

  /* ---------------------------------------------------------------- errors */
  async function problemFrom(response) {
    let code = `http_${response.status}`;
    let detail = `HTTP ${response.status} ${response.statusText || ""}`.trim();
    try {
      const body = await response.json();
      if (body && typeof body.code === "string") code = body.code;
      if (body && typeof body.detail === "string") detail = body.detail;
      else if (body && body.detail) detail = JSON.stringify(body.detail);
    } catch (error) { /* not JSON: keep the HTTP status */ }
    return { code, detail, status: response.status };
  }

  function friendly(problem) {
    if (ERROR_TEXT[problem.code]) return ERROR_TEXT[problem.code];
    if (problem.status === 413) return ERROR_TEXT.too_large;
    if (problem.status === 415) return ERROR_TEXT.not_an_image;
    if (problem.status >= 500) return "The server failed while processing this file. Retry, and tell the operator if it keeps happening.";
    return "The server could not process this file.";
  }

  function humanReason(reason) {
    let m = /^confidence ([\d.]+) below review threshold ([\d.]+)/.exec(reason);
    if (m) return `Confidence ${pct(+m[1], 2)} is below the review threshold of ${pct(+m[2], 2)}.`;
    m = /^field QC: (\w+)/.exec(reason);
    if (m) {
      const qc = { blurred: "the field looks blurred", empty: "the field looks empty (little stained material)",
        overexposed: "the field looks overexposed" };
      return `Image quality: ${qc[m[1]] || m[1]}.`;
    }
    if (reason === "no cells segmented") return "No cells were found by the segmentation.";
    m = /^out_of_distribution: score ([\d.]+)/.exec(reason);
    if (m) return `Out of distribution (score ${(+m[1]).toFixed(2)}; over 1 means unlike the fields the model was trained on): the answer may not apply to this image.`;
    m = /^scale_adjusted: red cells ([\d.]+) px across, training fields ([\d.]+)-([\d.]+) px; field resized x([\d.]+)/.exec(reason);
    if (m) return `Another magnification: red cells ${m[1]} px across (training ${m[2]}-${m[3]} px), so the field was resized ×${m[4]} before analysis. Give the pixel size to skip this check.`;
    m = /^scale_out_of_range: (?:red cells|texture scale) ([\d.]+) px(?: across)?, training fields ([\d.]+)-([\d.]+) px/.exec(reason);
    if (m) return `Cell size out of range (${m[1]} px, training ${m[2]}-${m[3]} px): another magnification, or not a smear field.`;
    if (reason.startsWith("scale_unknown")) return "The magnification could not be measured (too few cells): give the pixel size.";
    return reason;
  }

  /* ---------------------------------------------------------------- classification queue */
  const queue = [];
  let active = 0;
  let cardCount = 0;

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    $("results-bar").hidden = false;
    for (const file of files) {
      const card = createCard(file);
      queue.push({ file, card });
    }
    announce(`${files.length} file${files.length > 1 ? "s" : ""} added for analysis.`);
    updateSummary();
    pump();
  }

  function pump() {
    while (active < CONCURRENCY && queue.length) {
      const item = queue.shift();
      active += 1;
      classify(item).finally(() => {
        active -= 1;
        pump();
      });
    }
  }

  function createCard(file) {
    cardCount += 1;
    const node = $("result-template").content.firstElementChild.cloneNode(true);
    node.id = `result-${cardCount}`;
    node.dataset.index = String(cardCount);
    node.querySelector(".filename").textContent = file.name || "pasted image";
    node.querySelector(".card-meta").textContent = bytes(file.size);
    setPending(node, readiness.ready || !readiness.checked ? "Queued…" : "Waiting for the server…");
    $("results").append(node);
    return node;
  }

  function setPending(card, text) {
    card.dataset.state = "pending";
    card.querySelector("article").setAttribute("aria-busy", "true");
    card.querySelector(".verdict").replaceChildren(h("span", { class: "pending" },
      h("span", { class: "spinner", "aria-hidden": "true" }), text));
    card.querySelector(".card-body").replaceChildren();
  }

  async function classify({ file, card }) {
    if (!readiness.ready) {
      setPending(card, "Waiting for the server…");
      await whenReady();
    }
    if (readiness.maxUploadBytes && file.size > readiness.maxUploadBytes) {
      showError(card, file, { code: "too_large", status: 413,
        detail: `${bytes(file.size)} is over the server's upload limit of ${bytes(readiness.maxUploadBytes)}` });
      return;
    }
    setPending(card, "Analysing…");
    const form = new FormData();
    form.append("file", file, file.name || "pasted.png");
    const started = performance.now();
    const pixelSize = $("pixel-size").valueAsNumber;
    const query = Number.isFinite(pixelSize) && pixelSize > 0 ? `&pixel_size_um=${pixelSize}` : "";
    let response;
    try {
      response = await apiFetch(`v1/classify?images=true&explain=true${query}`, { method: "POST", body: form, headers: { Accept: "application/json" } });
    } catch (error) {
      showError(card, file, { code: "network", detail: String(error.message || error), status: 0 });
      return;
    }
    if (!response.ok) {
      const problem = await problemFrom(response);
      if (problem.code === "inference_unavailable" || response.status === 503) checkReady();
      showError(card, file, problem);
      return;
    }
    let result;
    try {
      result = await response.json();
    } catch (error) {
      showError(card, file, { code: "bad_response", detail: String(error.message || error), status: response.status });
      return;
    }
    showResult(card, file, result, performance.now() - started);
  }

  function finishCard(card, state) {
    card.dataset.state = state;
    card.querySelector("article").setAttribute("aria-busy", "false");
    updateSummary();
  }

  function showError(card, file, problem) {
    const name = file.name || "pasted image";
    const message = friendly(problem);
    const retry = RETRYABLE.has(problem.code)
      ? h("button", { type: "button", class: "btn btn-quiet btn-small", onclick: () => {
        setPending(card, "Analysing…");
        updateSummary();
        queue.push({ file, card });
        pump();
      } }, "Retry")
      : null;
    card.querySelector(".verdict").replaceChildren(h("span", { class: "badge badge-error" }, "Not analysed"));
    card.querySelector(".card-body").replaceChildren(
      h("div", { class: "error-box", role: "alert" },
        h("p", { class: "error-message", text: message }),
        h("p", { class: "error-detail" }, h("span", { class: "error-code", text: problem.code }), " ", problem.detail),
        retry));
    finishCard(card, "error");
    announce(`${name}: not analysed. ${message}`);
  }

  function showResult(card, file, result, elapsedMs) {
    const index = card.dataset.index;
    const name = result.filename || file.name || "pasted image";
    const images = result.images || {};
    const label = result.label;
    const review = Boolean(result.needs_review);
    card.dataset.label = label;
    card.dataset.review = String(review);
    card.querySelector(".filename").textContent = name;
    const total = result.timings_ms && result.timings_ms.total;
    card.querySelector(".card-meta").textContent =
      `${bytes(file.size)} · analysed in ${Math.round(total || elapsedMs)} ms`;

    card.querySelector(".verdict").replaceChildren(
      h("div", { class: "verdict-class", "data-class": label },
        h("span", { class: "verdict-label", text: className(label) }),
        h("span", { class: "verdict-conf" }, `${pct(result.confidence)} confidence`)),
      review
        ? h("span", { class: "badge badge-review" }, h("span", { "aria-hidden": "true" }, "!"), " Needs review")
        : h("span", { class: "badge badge-ok" }, "Above review threshold"));

    const body = [];
    if (review) {
      body.push(h("div", { class: "review-box", role: "note" },
        h("p", { class: "review-title" }, "Needs review by a specialist"),
        h("ul", { class: "review-reasons" }, (result.review_reasons || []).map((r) => h("li", { text: humanReason(r) })))));
    }
    body.push(h("div", { class: "card-grid" }, imagesBlock(index, name, images, result.label), analysisBlock(result, images)));
    body.push(detailsBlock(result));
    card.querySelector(".card-body").replaceChildren(...body);
    finishCard(card, "done");
    announce(`${name}: ${className(label)}, ${pct(result.confidence, 0)} confidence${review ? ", needs review" : ""}.`);
  }

  function imagesBlock(index, name, images, label) {
    const overlay = h("img", { class: "overlay", alt: `Segmentation mask overlaid on ${name}`, src: images.mask || "",
      "data-layer": "mask", width: 224, height: 224, draggable: "false" });
    overlay.style.opacity = String(DEFAULT_OPACITY / 100);
    const legend = h("div", { class: "overlay-legend", "data-layer": "mask" },
      h("span", { class: "legend-swatch legend-mask", "aria-hidden": "true" }), h("span", { class: "legend-text", text: "Cells (segmentation mask)" }));

    const opacityId = `opacity-${index}`;
    const output = h("output", { for: opacityId, class: "opacity-value", text: `${DEFAULT_OPACITY}%` });
    const slider = h("input", { type: "range", id: opacityId, class: "opacity", min: 0, max: 100, step: 5,
      value: DEFAULT_OPACITY, "aria-valuetext": `${DEFAULT_OPACITY}%` });
    slider.addEventListener("input", () => {
      overlay.style.opacity = String(slider.value / 100);
      output.textContent = `${slider.value}%`;
      slider.setAttribute("aria-valuetext", `${slider.value}%`);
    });

    const layers = [["mask", "Mask"], ["evidence", "Evidence"], ["attention", "U-Net gate"], ["none", "None"]]
      .filter(([value]) => value !== "evidence" || images.evidence);
    const radios = layers.map(([value, text]) => h("label", { class: "seg" },
      h("input", { type: "radio", name: `overlay-${index}`, value, checked: value === "mask",
        onchange: () => setLayer(value) }),
      h("span", { text })));

    const caption = h("figcaption", { text: "Original with mask overlay" });

    function setLayer(layer) {
      overlay.dataset.layer = layer;
      const named = { mask: "mask", evidence: "occlusion evidence", attention: "U-Net gate" };
      caption.textContent = layer === "none" ? "Original" : `Original with ${named[layer]} overlay`;
      legend.dataset.layer = layer;
      const visible = layer !== "none";
      overlay.hidden = !visible;
      slider.disabled = !visible;
      if (layer === "mask") {
        overlay.src = images.mask || "";
        overlay.alt = `Segmentation mask overlaid on ${name}`;
        legend.replaceChildren(h("span", { class: "legend-swatch legend-mask", "aria-hidden": "true" }),
          h("span", { class: "legend-text", text: "Cells (segmentation mask)" }));
      } else if (layer === "evidence") {
        overlay.src = images.evidence || "";
        overlay.alt = `Occlusion evidence for ${className(label)} overlaid on ${name}`;
        const peak = images.evidence_peak || 0;
        legend.replaceChildren(
          h("span", { class: "legend-text", text: `Hiding it lowers the ${className(label)} call: not at all` }),
          h("span", { class: "legend-ramp", "aria-hidden": "true" }),
          h("span", { class: "legend-text", text: peak >= 0.1
            ? `most (log-odds −${peak.toFixed(2)})`
            : `at most log-odds −${peak.toFixed(2)}: no region decides it` }));
      } else if (layer === "attention") {
        overlay.src = images.attention || "";
        overlay.alt = `Attention U-Net attention map overlaid on ${name}`;
        legend.replaceChildren(h("span", { class: "legend-text", text: "U-Net attention gate (not what decided the class): low" }),
          h("span", { class: "legend-ramp", "aria-hidden": "true" }), h("span", { class: "legend-text", text: "high" }));
      } else {
        legend.replaceChildren(h("span", { class: "legend-text", text: "No overlay" }));
      }
    }

    return h("div", { class: "images" },
      h("div", { class: "figures" },
        h("figure", { class: "figure" },
          h("div", { class: "stage" },
            h("img", { class: "base", src: images.original || "", alt: `Original field ${name}`, width: 224, height: 224 }),
            overlay),
          caption),
        h("figure", { class: "figure" },
          h("div", { class: "stage" },
            h("img", { class: "base", src: images.preprocessed || "", alt: `Preprocessed field ${name}`, width: 224, height: 224 })),
          h("figcaption", {}, `Preprocessed (${(images.preprocessing || []).join(", ") || "as served"})`))),
      h("div", { class: "overlay-controls" },
        h("fieldset", { class: "segmented" }, h("legend", { class: "control-label", text: "Overlay" }), radios),
        h("div", { class: "opacity-control" },
          h("label", { for: opacityId, class: "control-label", text: "Opacity" }), slider, output)),
      legend);
  }

  function analysisBlock(result, images) {
    const probabilities = result.probabilities || {};
    const rows = Object.entries(probabilities).map(([label, p]) => h("li", {
      class: `prob${label === result.label ? " prob-top" : ""}`, "data-class": label },
    h("span", { class: "prob-name", text: className(label) }),
    h("span", { class: "prob-track", "aria-hidden": "true" }, (() => {
      const fill = h("span", { class: "prob-fill" });
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      return fill;
    })()),
    h("span", { class: "prob-value", text: pct(p) })));

    const threshold = typeof result.review_threshold === "number" ? result.review_threshold : null;
    const confidence = h("p", { class: "confidence-line" },
      h("span", { class: "muted" }, "Confidence "), h("strong", { text: pct(result.confidence) }),
      threshold !== null ? h("span", { class: "muted" }, ` · review below ${pct(threshold, 2)}`) : null);

    const crops = images.cells || [];
    const count = result.cell_count ?? 0;
    const gallery = crops.length
      ? h("ul", { class: "cells", "aria-label": "Detected cells" }, crops.map((src, i) =>
        h("li", {}, h("img", { src, width: 64, height: 64, alt: `Detected cell ${i + 1} of ${count}` }))))
      : null;
    const cellsNote = crops.length && crops.length < count ? ` (showing the ${crops.length} largest)` : "";

    return h("div", { class: "analysis" },
      h("h4", { class: "section-label", text: "Class probabilities" }),
      h("ul", { class: "probs" }, rows),
      confidence,
      h("h4", { class: "section-label", text: "Cells" }),
      h("p", { class: "cell-count" }, h("strong", { text: String(count) }),
        ` cell${count === 1 ? "" : "s"} found by watershed${cellsNote}`),
      gallery);
  }

  function detailsBlock(result) {
    const timings = Object.entries(result.timings_ms || {})
      .map(([stage, ms]) => `${stage} ${Math.round(ms)} ms`).join(" · ");
    const qc = result.qc || {};
    const qcText = [
      typeof qc.stained_fraction === "number" ? `stained ${pct(qc.stained_fraction, 0)}` : null,
      typeof qc.sharpness === "number" ? `sharpness ${qc.sharpness.toFixed(0)}` : null,
      typeof qc.saturated_fraction === "number" ? `saturated ${pct(qc.saturated_fraction, 1)}` : null,
    ].filter(Boolean).join(" · ");
    const scaleText = [
      typeof result.pixel_size_um === "number" ? `${result.pixel_size_um.toFixed(3)} µm/px` : null,
      typeof result.scale === "number" ? `red cells ${result.scale.toFixed(1)} px` : null,
      typeof result.rescaled_by === "number" ? `resized ×${result.rescaled_by.toFixed(2)}` : null,
    ].filter(Boolean).join(" · ");
    return h("p", { class: "card-foot" },
      h("span", {}, `Model ${result.model_version || "unknown"}`),
      timings ? h("span", {}, `Timings: ${timings}`) : null,
      qcText ? h("span", {}, `Field QC: ${qcText}`) : null,
      scaleText ? h("span", { class: "scale-info" }, `Scale: ${scaleText}`) : null);
  }

  function updateSummary() {
    const cards = Array.from($("results").children);
    const count = (state) => cards.filter((c) => c.dataset.state === state).length;
    const review = cards.filter((c) => c.dataset.review === "true").length;
    const parts = [`${cards.length} field${cards.length === 1 ? "" : "s"}`];
    if (count("pending")) parts.push(`${count("pending")} in progress`);
    if (count("done")) parts.push(`${count("done")} analysed`);
    if (review) parts.push(`${review} need${review === 1 ? "s" : ""} review`);
    if (count("error")) parts.push(`${count("error")} not analysed`);
    $("results-summary").textContent = parts.join(" · ");
    $("results-bar").hidden = cards.length === 0;
    $("results-empty").hidden = cards.length > 0;
  }

  /* ---------------------------------------------------------------- drop zone */
  function setUpDropZone() {
    const zone = $("dropzone");
    const input = $("file-input");
    const open = () => input.click();
    zone.addEventListener("click", open);
    /* Like a native button: the key press arms it, the release opens the picker (no auto-repeat, and the
     * browser has registered the user activation that a file picker needs by then). */
    const isActivationKey = (event) => event.key === "Enter" || event.key === " " || event.key === "Spacebar";
    let armed = false;
    zone.addEventListener("keydown", (event) => {
      if (!isActivationKey(event)) return;
      event.preventDefault();
      armed = !event.repeat || armed;
    });
    zone.addEventListener("keyup", (event) => {
      if (!isActivationKey(event) || !armed) return;
      event.preventDefault();
      armed = false;
      open();
    });
    zone.addEventListener("blur", () => { armed = false; });
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = "";
    });
    let depth = 0;
    zone.addEventListener("dragenter", (event) => {
      event.preventDefault();
      depth += 1;
      zone.classList.add("dragover");
    });
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
    });
    zone.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) zone.classList.remove("dragover");
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      depth = 0;
      zone.classList.remove("dragover");
      addFiles(event.dataTransfer && event.dataTransfer.files);
    });
    /* A file dropped beside the zone must not navigate away from the results. */
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
    document.addEventListener("paste", (event) => {
      const target = event.target;
      if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
      const files = Array.from((event.clipboardData && event.clipboardData.files) || [])
        .filter((f) => f.type.startsWith("image/"));
      if (files.length) addFiles(files);
    });
    $("clear-results").addEventListener("click", () => {
      for (const card of Array.from($("results").children)) {
        if (card.dataset.state !== "pending") card.remove();
      }
      updateSummary();
      zone.focus();
    });
  }

  /* ---------------------------------------------------------------- batch jobs */
  /* GET v1/jobs lists jobs ({jobs: [...]}, newest first); GET v1/jobs/{id} adds live per-slide summaries. */
  const jobs = { timer: null, statuses: new Map(), details: new Map() };
  const STATUS_TEXT = { running: "Running", queued: "Queued", done: "Done", failed: "Failed" };
  const DETAIL_LIMIT = 8;

  function scheduleJobs(ms) {
    clearTimeout(jobs.timer);
    jobs.timer = setTimeout(loadJobs, ms);
  }

  function jobsUnavailable() {
    clearTimeout(jobs.timer);
    $("jobs-unavailable").hidden = false;
    $("job-form").hidden = true;
    $("jobs-empty").hidden = true;
    $("jobs").replaceChildren();
  }

  async function loadJobs() {
    clearTimeout(jobs.timer);
    let response;
    try {
      response = await apiFetch("v1/jobs", { cache: "no-store", headers: { Accept: "application/json" } });
    } catch (error) {
      $("job-message").textContent = "Cannot reach the server to list jobs; retrying.";
      scheduleJobs(JOBS_IDLE_MS);
      return;
    }
    if (response.status === 404 || response.status === 405) {
      jobsUnavailable();
      return;
    }
    if (!response.ok) {
      const problem = await problemFrom(response);
      $("job-message").textContent = `Cannot list jobs: ${friendly(problem)}`;
      scheduleJobs(JOBS_IDLE_MS);
      return;
    }
    let list;
    try {
      const data = await response.json();
      list = Array.isArray(data) ? data : (data && (data.jobs || data.items)) || [];
    } catch (error) {
      scheduleJobs(JOBS_IDLE_MS);
      return;
    }
    renderJobs(list);
    const running = list.some((job) => job.status === "running" || job.status === "queued");
    scheduleJobs(running ? JOBS_POLL_MS : JOBS_IDLE_MS);
    refreshDetails(list.slice(0, DETAIL_LIMIT));
  }

  /* Slide summaries of the newest jobs: fetched while a job moves, kept once it has finished. */
  async function refreshDetails(list) {
    await Promise.all(list.map(async (job) => {
      const id = String(job.id);
      const known = jobs.details.get(id);
      if (known && known.status === job.status && known.done === job.done && known.failed === job.failed) return;
      try {
        const response = await apiFetch(`v1/jobs/${encodeURIComponent(id)}`, { cache: "no-store", headers: { Accept: "application/json" } });
        if (!response.ok) return;
        const detail = await response.json();
        jobs.details.set(id, { status: job.status, done: job.done, failed: job.failed, detail });
        const item = $("jobs").querySelector(`li[data-job-id="${CSS.escape(id)}"]`);
        if (item) updateJobItem(item, job);
      } catch (error) { /* the next poll tries again */ }
    }));
  }

  function createdTime(created) {
    if (created === null || created === undefined || created === "") return null;
    const date = typeof created === "number" ? new Date(created < 1e12 ? created * 1000 : created) : new Date(created);
    return Number.isNaN(date.getTime()) ? null : date;
  }

  function slidesOf(job) {
    const cached = jobs.details.get(String(job.id));
    const slides = (cached && cached.detail && cached.detail.slides) || job.slides;
    return Array.isArray(slides) ? slides.filter((s) => s && typeof s === "object") : [];
  }

  function jobTitle(job) {
    const names = slidesOf(job).map((s) => s.slide_id).filter(Boolean);
    if (job.slide_id) return String(job.slide_id);
    if (names.length) return names.length > 2 ? `${names.slice(0, 2).join(", ")} +${names.length - 2} slides` : names.join(", ");
    return `Job ${job.id}`;
  }

  function jobState(job) {
    if (job.status === "running" && job.detail === "queued") return "queued";
    return job.status;
  }

  /* A URL the API gives as an absolute path, made relative so the page also works behind a path prefix. */
  const relativeUrl = (url) => String(url).replace(/^\/+/, "");

  function renderJobs(list) {
    const container = $("jobs");
    $("jobs-unavailable").hidden = true;
    $("job-form").hidden = false;
    $("jobs-empty").hidden = list.length > 0;
    const keep = new Set();
    list.forEach((job, position) => {
      const id = String(job.id);
      keep.add(id);
      let item = container.querySelector(`li[data-job-id="${CSS.escape(id)}"]`);
      if (!item) item = buildJobItem(id);
      updateJobItem(item, job);
      if (container.children[position] !== item) container.insertBefore(item, container.children[position] || null);
      const state = jobState(job);
      const before = jobs.statuses.get(id);
      if (before && before !== state) announce(`Batch job ${jobTitle(job)}: ${(STATUS_TEXT[state] || state).toLowerCase()}.`);
      jobs.statuses.set(id, state);
    });
    for (const item of Array.from(container.children)) {
      if (!keep.has(item.dataset.jobId)) item.remove();
    }
  }

  function buildJobItem(id) {
    return h("li", { class: "job", "data-job-id": id },
      h("div", { class: "job-head" },
        h("span", { class: "job-title" }),
        h("span", { class: "status-badge" })),
      h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0 }, h("span", { class: "progress-fill" })),
      h("p", { class: "job-meta muted" }),
      h("p", { class: "job-detail" }),
      h("ul", { class: "job-slides" }),
      h("p", { class: "job-links" }));
  }

  function updateJobItem(item, job) {
    const id = String(job.id);
    const state = jobState(job);
    const done = Number(job.done) || 0;
    const failed = Number(job.failed) || 0;
    const total = Number(job.total) || done + failed;
    const processed = Math.min(total, done + failed);
    const title = jobTitle(job);
    item.dataset.status = state;
    const titleNode = item.querySelector(".job-title");
    titleNode.textContent = title;
    titleNode.title = `Job ${id}`;
    item.querySelector(".status-badge").textContent = STATUS_TEXT[state] || state;

    const bar = item.querySelector(".progress");
    bar.setAttribute("aria-valuemax", String(total || 1));
    bar.setAttribute("aria-valuenow", String(processed));
    bar.setAttribute("aria-label", `Progress of ${title}`);
    bar.setAttribute("aria-valuetext", `${processed} of ${total} fields`);
    const share = total ? processed / total : state === "done" ? 1 : 0;
    item.querySelector(".progress-fill").style.width = `${100 * share}%`;

    const created = createdTime(job.created);
    const meta = [`${done} of ${total} fields`];
    if (failed) meta.push(`${failed} failed`);
    if (created) meta.push(`started ${created.toLocaleString([], { dateStyle: "short", timeStyle: "short" })}`);
    item.querySelector(".job-meta").textContent = meta.join(" · ");
    const detail = item.querySelector(".job-detail");
    detail.textContent = state === "failed" && job.detail ? job.detail : "";

    const slides = slidesOf(job);
    item.querySelector(".job-slides").replaceChildren(...slides.map((slide) => {
      const leading = slide.verdict
        ? `${className(slide.verdict)}${typeof slide.verdict_confidence === "number" ? ` (${pct(slide.verdict_confidence, 0)})` : ""}`
        : "";
      const reasons = (slide.verdict_reasons || []).join("; ");
      const verdict = slide.verdict_status === "conclusive" ? leading
        : slide.verdict_status === "inconclusive" ? `Inconclusive: needs review (${reasons}${leading ? `; leading: ${leading}` : ""})`
        : slide.verdict_status === "failed" ? `Failed: ${reasons}`
        : "no verdict yet";
      const review = slide.review_fields ? ` · ${slide.review_fields} for review` : "";
      return h("li", { class: "job-slide", "data-class": slide.verdict_status === "conclusive" ? slide.verdict : null,
        "data-verdict": slide.verdict_status || null },
        h("span", { class: "slide-name", text: slide.slide_id }),
        h("span", { class: "slide-verdict", text: `${verdict}${review}` }),
        slide.report
          ? h("a", { href: relativeUrl(slide.report), target: "_blank", rel: "noopener",
            "aria-label": `Report for slide ${slide.slide_id}` }, "Report")
          : null);
    }));

    const finished = state === "done" || state === "failed";
    const report = job.report ? relativeUrl(job.report)
      : finished && !("report" in job) ? `v1/jobs/${encodeURIComponent(id)}/files/index.html` : null;
    const links = item.querySelector(".job-links");
    const current = links.querySelector("a");
    if (report && (!current || current.getAttribute("href") !== report)) {
      links.replaceChildren(h("a", { href: report, target: "_blank", rel: "noopener",
        text: state === "failed" ? "Open job report (incomplete)" : "Open job report" }));
    } else if (!report) {
      links.replaceChildren(h("span", { class: "muted", text: finished ? "No report was written" : "Report when the job is done" }));
    }
  }

  function setUpJobs() {
    $("jobs-refresh").addEventListener("click", () => {
      $("job-message").textContent = "";
      loadJobs();
    });
    $("job-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const files = Array.from($("job-files").files || []);
      const message = $("job-message");
      message.dataset.kind = "";
      if (!files.length) {
        message.dataset.kind = "error";
        message.textContent = "Choose at least one field image for the job.";
        $("job-files").focus();
        return;
      }
      const form = new FormData();
      for (const file of files) form.append("files", file, file.name);
      const slide = $("job-slide").value.trim();
      if (slide) form.append("slide_id", slide);
      const button = $("job-submit");
      button.disabled = true;
      message.textContent = `Uploading ${files.length} file${files.length > 1 ? "s" : ""}…`;
      try {
        const response = await apiFetch("v1/jobs", { method: "POST", body: form, headers: { Accept: "application/json" } });
        if (response.status === 404 || response.status === 405) {
          jobsUnavailable();
          return;
        }
        if (!response.ok) {
          const problem = await problemFrom(response);
          message.dataset.kind = "error";
          message.replaceChildren(`The job was not started. ${friendly(problem)} `,
            h("span", { class: "error-detail", text: `(${problem.detail})` }));
          return;
        }
        const job = await response.json().catch(() => ({}));
        message.dataset.kind = "ok";
        message.textContent = `Job ${job && job.id ? `${job.id} ` : ""}started with ${files.length} file${files.length > 1 ? "s" : ""}.`;
        announce(message.textContent);
        $("job-form").reset();
        loadJobs();
      } catch (error) {
        message.dataset.kind = "error";
        message.textContent = `The job was not started. ${ERROR_TEXT.network}`;
      } finally {
        button.disabled = false;
      }
    });
  }

  /* ---------------------------------------------------------------- start */
  function start() {
    setUpDropZone();
    setUpJobs();
    checkReady();
    loadJobs();
    document.body.dataset.app = "ready";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
