"""The reader-study web page: one self-contained static HTML file.

Everything is inline (CSS, JS, images as base64 PNG data URIs), so the file opens from disk in any
browser with no server and no network. The page holds only what a reader may see: the study id,
random trial ids, trial types and images, in presentation order. The answer key is never in it.

Reader workflow: R / S (or the buttons) answers real / synthetic, 1..N gives the confidence and
moves on; arrows go back and forth; progress is shown; answers live in localStorage under the
study id, so a reload keeps them; "Export answers" downloads a JSON file for `score`.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Sequence

ANSWERS_FORMAT = "brain_ldm_jax.reader_study.answers/1"
STORAGE_PREFIX = "brain_ldm_reader_study:"


def data_uri(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page_payload(study_id: str, title: str, confidence_levels: int,
                 trials: Sequence[dict]) -> dict:
  """What the page's script gets; `trials` are dicts with id, type and images (PNG bytes)."""
  return {
      "format": ANSWERS_FORMAT,
      "study_id": study_id,
      "title": title,
      "confidence_levels": int(confidence_levels),
      "storage_key": STORAGE_PREFIX + study_id,
      "trials": [{"id": t["id"], "type": t["type"], "images": [data_uri(p) for p in t["images"]]}
                 for t in trials],
  }


def build_page(payload: dict) -> str:
  """The complete HTML document for `payload` (from `page_payload`)."""
  # "</" cannot appear inside a <script> element; JSON allows escaping "/" so this is lossless.
  data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
  levels = payload["confidence_levels"]
  conf_buttons = "".join(
      f'<button type="button" class="conf" data-conf="{i}">{i}</button>'
      for i in range(1, levels + 1))
  return (_TEMPLATE
          .replace("@@TITLE@@", html.escape(payload["title"]))
          .replace("@@STUDY@@", html.escape(payload["study_id"]))
          .replace("@@LEVELS@@", str(levels))
          .replace("@@CONF_BUTTONS@@", conf_buttons)
          .replace("@@DATA@@", data))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>@@TITLE@@</title>
<style>
  :root { color-scheme: dark; }
  body { margin: 0; background: #111; color: #ddd; font: 15px/1.4 system-ui, sans-serif; }
  header { display: flex; flex-wrap: wrap; gap: 12px 24px; align-items: center;
           padding: 10px 16px; background: #1b1b1b; border-bottom: 1px solid #333; }
  header h1 { font-size: 16px; margin: 0; font-weight: 600; }
  header .study { color: #888; font-size: 12px; }
  label { color: #aaa; }
  input[type=text] { background: #222; color: #eee; border: 1px solid #555; padding: 4px 6px;
                     border-radius: 4px; width: 14em; }
  #progress-text { min-width: 13em; }
  progress { width: 180px; height: 10px; }
  main { padding: 12px 16px; }
  #view { display: flex; gap: 8px; justify-content: center; align-items: center;
          background: #000; min-height: 60vh; padding: 8px; border-radius: 6px; }
  #view img { height: min(66vh, 560px); width: auto; max-width: 100%; object-fit: contain;
              user-select: none; }
  #view.triplet img { height: min(48vh, 420px); max-width: 32%; }
  .controls { display: flex; flex-wrap: wrap; gap: 10px 28px; justify-content: center;
              align-items: center; margin: 14px 0 6px; }
  .group { display: flex; gap: 6px; align-items: center; }
  button { background: #2a2a2a; color: #eee; border: 1px solid #555; border-radius: 5px;
           padding: 7px 14px; font: inherit; cursor: pointer; }
  button:hover { border-color: #999; }
  button.selected { background: #3b5b8c; border-color: #8fb0e0; }
  button.conf { min-width: 2.6em; }
  #export { background: #2d4a2d; }
  #message { text-align: center; min-height: 1.4em; color: #e6c86e; }
  .help { text-align: center; color: #888; font-size: 13px; }
  kbd { background: #333; border: 1px solid #555; border-radius: 3px; padding: 0 4px;
        font-size: 12px; }
</style>
</head>
<body>
<header>
  <div><h1>@@TITLE@@</h1><div class="study">study @@STUDY@@</div></div>
  <div><label for="reader">Reader</label> <input id="reader" type="text" autocomplete="off"
       placeholder="your name or alias"></div>
  <div><span id="progress-text"></span> <progress id="progress" max="1" value="0"></progress></div>
  <div><button type="button" id="export">Export answers</button></div>
</header>
<main>
  <div id="view" aria-live="polite"></div>
  <div class="controls">
    <div class="group"><button type="button" id="prev" title="previous (left arrow)">&larr; Back</button></div>
    <div class="group">
      <button type="button" class="answer" data-answer="real"><kbd>R</kbd> Real</button>
      <button type="button" class="answer" data-answer="synthetic"><kbd>S</kbd> Synthetic</button>
    </div>
    <div class="group"><span>Confidence</span> @@CONF_BUTTONS@@</div>
    <div class="group"><button type="button" id="next" title="next (right arrow)">Next &rarr;</button></div>
  </div>
  <div id="message"></div>
  <p class="help">Is this brain MRI from a real scan or generated by a model?
    <kbd>R</kbd> real, <kbd>S</kbd> synthetic, then confidence <kbd>1</kbd> (guess) to
    <kbd>@@LEVELS@@</kbd> (certain), which moves on. <kbd>&larr;</kbd> <kbd>&rarr;</kbd> move between
    trials; you may change an answer. Answers are kept in this browser; when done, press
    <b>Export answers</b> and send the downloaded file.</p>
</main>
<script type="application/json" id="study-data">@@DATA@@</script>
<script>
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("study-data").textContent);
  const TRIALS = DATA.trials;
  const N = TRIALS.length;
  const LEVELS = DATA.confidence_levels;
  const $ = (id) => document.getElementById(id);
  let storageOk = true;

  function now() { return new Date().toISOString(); }

  function loadState() {
    try {
      const raw = window.localStorage.getItem(DATA.storage_key);
      if (raw) {
        const s = JSON.parse(raw);
        if (s && typeof s === "object" && s.answers) return s;
      }
    } catch (e) { storageOk = false; }
    return { reader: "", index: 0, answers: {}, shown: {} };
  }

  let state = loadState();
  state.shown = state.shown || {};

  function save() {
    try { window.localStorage.setItem(DATA.storage_key, JSON.stringify(state)); }
    catch (e) { storageOk = false; }
    if (!storageOk) message("This browser does not keep answers across a reload here: export before closing.");
  }

  function message(text) { $("message").textContent = text || ""; }

  function countAnswered() {
    let n = 0;
    for (const t of TRIALS) { const a = state.answers[t.id]; if (a && a.answer && a.confidence) n++; }
    return n;
  }

  function complete(id) { const a = state.answers[id]; return !!(a && a.answer && a.confidence); }

  function render() {
    const i = Math.max(0, Math.min(N - 1, state.index | 0));
    state.index = i;
    const t = TRIALS[i];
    if (!state.shown[t.id]) { state.shown[t.id] = now(); save(); }
    const view = $("view");
    view.className = t.type;
    view.replaceChildren();
    for (const src of t.images) {
      const img = document.createElement("img");
      img.src = src; img.alt = ""; img.draggable = false;
      view.appendChild(img);
    }
    const a = state.answers[t.id] || {};
    for (const b of document.querySelectorAll("button.answer"))
      b.classList.toggle("selected", b.dataset.answer === a.answer);
    for (const b of document.querySelectorAll("button.conf"))
      b.classList.toggle("selected", Number(b.dataset.conf) === a.confidence);
    const done = countAnswered();
    $("progress-text").textContent = "Trial " + (i + 1) + " of " + N + " \u00b7 " + done + " answered";
    $("progress").value = N ? done / N : 0;
    $("prev").disabled = i === 0;
    $("next").disabled = i === N - 1;
  }

  function go(delta) { state.index = Math.max(0, Math.min(N - 1, state.index + delta)); save(); message(""); render(); }

  function nextOpen() {
    // Move to the next unanswered trial after the current one (wrapping), else stay.
    for (let k = 1; k <= N; k++) {
      const j = (state.index + k) % N;
      if (!complete(TRIALS[j].id)) { state.index = j; return true; }
    }
    return false;
  }

  function record(field, value) {
    const t = TRIALS[state.index];
    const wasComplete = complete(t.id);
    const a = state.answers[t.id] || {};
    a[field] = value;
    a.answered_at = now();
    a.shown_at = state.shown[t.id];
    a.response_ms = Date.parse(a.answered_at) - Date.parse(a.shown_at);
    state.answers[t.id] = a;
    let moved = false;  // eslint-disable-line no-unused-vars
    // Confidence is the last step: it moves on. An answer that completes a trial does too.
    if (a.answer && a.confidence && (field === "confidence" || !wasComplete)) {
      // Next unanswered trial; once all are answered (a reader revising), simply the next one.
      moved = nextOpen();
      if (!moved && state.index < N - 1) state.index += 1;
      message(countAnswered() === N ? "All " + N + " trials answered. Press Export answers to download them." : "");
    } else if (field === "confidence" && !a.answer) {
      message("Now choose Real (R) or Synthetic (S).");
    } else if (field === "answer" && !a.confidence) {
      message("");
    }
    save();
    render();
  }

  function exportAnswers() {
    const reader = $("reader").value.trim();
    if (!reader) { message("Enter your name or an alias in the Reader field first."); $("reader").focus(); return; }
    state.reader = reader; save();
    const out = {
      format: DATA.format,
      study_id: DATA.study_id,
      reader: reader,
      exported_at: now(),
      confidence_levels: LEVELS,
      num_trials: N,
      num_answered: countAnswered(),
      user_agent: navigator.userAgent,
      answers: TRIALS.map((t, i) => {
        const a = state.answers[t.id] || {};
        return { trial_id: t.id, position: i + 1, trial_type: t.type,
                 answer: a.answer || null, confidence: a.confidence || null,
                 shown_at: state.shown[t.id] || null, answered_at: a.answered_at || null,
                 response_ms: (a.response_ms === undefined ? null : a.response_ms) };
      }),
    };
    const blob = new Blob([JSON.stringify(out, null, 2)], { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    const safe = reader.replace(/[^A-Za-z0-9_-]+/g, "_").slice(0, 40);
    link.download = "answers_" + DATA.study_id + "_" + safe + ".json";
    document.body.appendChild(link);
    link.click();
    setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 2000);
    message("Exported " + out.num_answered + " of " + N + " answers.");
  }

  $("reader").value = state.reader || "";
  $("reader").addEventListener("input", () => { state.reader = $("reader").value; save(); });
  $("reader").addEventListener("keydown", (e) => { if (e.key === "Enter") $("reader").blur(); });
  for (const b of document.querySelectorAll("button.answer"))
    b.addEventListener("click", () => record("answer", b.dataset.answer));
  for (const b of document.querySelectorAll("button.conf"))
    b.addEventListener("click", () => record("confidence", Number(b.dataset.conf)));
  $("prev").addEventListener("click", () => go(-1));
  $("next").addEventListener("click", () => go(1));
  $("export").addEventListener("click", exportAnswers);
  document.addEventListener("keydown", (e) => {
    if (e.target && (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    if (k === "r" || k === "R") record("answer", "real");
    else if (k === "s" || k === "S") record("answer", "synthetic");
    else if (/^[1-9]$/.test(k) && Number(k) <= LEVELS) record("confidence", Number(k));
    else if (k === "ArrowLeft") go(-1);
    else if (k === "ArrowRight" || k === "Enter") go(1);
    else return;
    e.preventDefault();
  });
  render();
  document.documentElement.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
