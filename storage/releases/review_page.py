"""The review page: one HTML file with its script inline (no build step, no outside resource).

Per finding (findings without a confidence first), the next box of the queue on its image, and
keys to judge it: **a** accept, **r** reject, **s** skip, **u** undo the reviewer's last verdict;
drag on the image to draw a new box, then **d** (or Enter) to store it as a redraw, Escape to
drop it. The same actions have buttons. The page polls the server every few seconds, so the
counts show every reviewer's progress. Writes carry the server's token (``X-Review-Token``).
"""

from __future__ import annotations

import html
import json

POLL_MS = 3000

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1rem; color: #222; }
header { display: flex; gap: 1rem; align-items: baseline; flex-wrap: wrap; }
#findings button { margin: 0 .3rem .3rem 0; }
#findings button.chosen { font-weight: bold; outline: 2px solid #225; }
#stage { position: relative; display: inline-block; user-select: none; cursor: crosshair; margin-top: .5rem; }
#stage img { display: block; max-width: min(900px, 95vw); max-height: 80vh; }
.box { position: absolute; border: 3px solid #f90; pointer-events: none; box-sizing: border-box; }
#drawn { border-color: #0c6; border-style: dashed; }
#status.error { color: #b00; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .25rem; }
"""

_SCRIPT = """
const config = JSON.parse(document.getElementById('config').textContent);
const $ = (id) => document.getElementById(id);
let reviewer = config.reviewer || localStorage.getItem('cxr-reviewer') || '';
let finding = null, current = null, drawn = null, dragStart = null, state = null;
$('reviewer').value = reviewer;
$('reviewer').addEventListener('change', () => {
  reviewer = $('reviewer').value.trim(); localStorage.setItem('cxr-reviewer', reviewer); loadNext();
});

function say(text, error) { $('status').textContent = text; $('status').className = error ? 'error' : ''; }

async function api(path, body) {
  const options = body === undefined ? {} : {method: 'POST', body: JSON.stringify(body),
    headers: {'Content-Type': 'application/json', 'X-Review-Token': config.token}};
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function counts(item) {
  const v = item.verdicts || {};
  const judged = (v.accept || 0) + (v.reject || 0) + (v.redraw || 0);
  return `${judged}/${item.boxes} (a ${v.accept || 0}, r ${v.reject || 0}, d ${v.redraw || 0}, s ${v.skip || 0})`;
}

async function refreshState() {
  state = await api('/api/state');
  if (finding === null && state.findings.length) finding = state.findings[0].finding;
  $('findings').replaceChildren(...state.findings.map((item) => {
    const button = document.createElement('button');
    button.textContent = `${item.finding}${item.has_confidence ? '' : ' (no confidence)'}: ${counts(item)}`;
    button.dataset.finding = item.finding;
    if (item.finding === finding) button.className = 'chosen';
    button.onclick = () => { finding = item.finding; refreshState(); loadNext(); };
    return button;
  }));
}

function place(element, box) {
  const scale = $('image').clientWidth / current.image_width;
  element.style.left = `${box[0] * scale}px`; element.style.top = `${box[1] * scale}px`;
  element.style.width = `${(box[2] - box[0]) * scale}px`; element.style.height = `${(box[3] - box[1]) * scale}px`;
  element.hidden = false;
}

async function loadNext() {
  if (!finding) return;
  drawn = null; $('drawn').hidden = true;
  current = await api(`/api/next?finding=${encodeURIComponent(finding)}&reviewer=${encodeURIComponent(reviewer)}`);
  if (current.done) {
    $('image').removeAttribute('src'); $('released').hidden = true;
    $('about').textContent = `${finding}: every box is judged`;
    document.body.dataset.box = '';
    return;
  }
  const confidence = current.confidence === null ? 'no confidence' : `confidence ${current.confidence.toFixed(2)}`;
  $('about').textContent =
    `${current.finding} on ${current.image_id}, rank ${current.rank}, ${confidence} (box ${current.box_id})`;
  $('image').onload = () => { place($('released'), current.box); document.body.dataset.box = current.box_id; };
  $('image').src = current.image_url;
}

async function judge(verdict) {
  if (!current || current.done) return;
  if (!reviewer) { say('enter your name first', true); $('reviewer').focus(); return; }
  const body = {box_id: current.box_id, verdict, reviewer};
  if (verdict === 'redraw') {
    if (!drawn) { say('drag on the image to draw the new box first', true); return; }
    body.box = drawn;
  }
  try {
    await api('/api/verdict', body);
    say(`${verdict}: box ${current.box_id}`);
    await refreshState(); await loadNext();
  } catch (error) { say(error.message, true); }
}

async function undo() {
  try {
    const result = await api('/api/undo', {reviewer});
    say(result.undone ? `undone: ${result.undone.verdict} of box ${result.undone.box_id}` : 'nothing to undo');
    if (result.undone) finding = result.undone.finding;
    await refreshState(); await loadNext();
  } catch (error) { say(error.message, true); }
}

function sourcePoint(event) {
  const rect = $('image').getBoundingClientRect();
  const scale = current.image_width / rect.width;
  const clamp = (value, high) => Math.min(Math.max(value, 0), high);
  return [clamp((event.clientX - rect.left) * scale, current.image_width),
          clamp((event.clientY - rect.top) * scale, current.image_height)];
}

$('stage').addEventListener('mousedown', (event) => {
  if (!current || current.done) return;
  event.preventDefault(); dragStart = sourcePoint(event);
});
window.addEventListener('mousemove', (event) => {
  if (!dragStart) return;
  const end = sourcePoint(event);
  drawn = [Math.min(dragStart[0], end[0]), Math.min(dragStart[1], end[1]),
           Math.max(dragStart[0], end[0]), Math.max(dragStart[1], end[1])];
  place($('drawn'), drawn);
});
window.addEventListener('mouseup', () => {
  const tiny = drawn && (drawn[2] - drawn[0] < 1 || drawn[3] - drawn[1] < 1);
  if (dragStart && tiny) { drawn = null; $('drawn').hidden = true; }
  dragStart = null;
  if (drawn) say('new box drawn: press d (or Enter) to store it as a redraw, Escape to drop it');
});

document.addEventListener('keydown', (event) => {
  if (event.target.tagName === 'INPUT') return;
  const key = event.key.toLowerCase();
  if (key === 'a') judge('accept');
  else if (key === 'r') judge('reject');
  else if (key === 's') judge('skip');
  else if (key === 'd' || key === 'enter') judge('redraw');
  else if (key === 'u' || (key === 'z' && (event.ctrlKey || event.metaKey))) undo();
  else if (key === 'escape') { drawn = null; $('drawn').hidden = true; say('drawn box dropped'); }
  else return;
  event.preventDefault();
});
for (const button of document.querySelectorAll('[data-verdict]')) button.onclick = () => judge(button.dataset.verdict);
$('undo').onclick = undo;

refreshState().then(loadNext).catch((error) => say(error.message, true));
setInterval(() => refreshState().catch((error) => say(error.message, true)), config.poll_ms);
"""


def review_page(version: str, token: str, reviewer: str, sampler: str) -> str:
    """The page for release ``version``; ``token`` authorises its writes; ``reviewer`` fills the
    name field (empty: the reviewer types it; the browser keeps it)."""
    config = json.dumps({"token": token, "reviewer": reviewer, "release": version, "poll_ms": POLL_MS})
    safe_config = config.replace("<", "\\u003c")  # nothing in it can close the script element
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Review release {html.escape(version)}</title>
<style>{_STYLE}</style>
<script type="application/json" id="config">{safe_config}</script>
</head><body>
<header><h1>Review release {html.escape(version)}</h1>
<label>Reviewer <input id="reviewer" autocomplete="name"></label>
<a href="/release/report/index.html">the release's report</a></header>
<p>Sampler: {html.escape(sampler)}.</p>
<p>Keys: <kbd>a</kbd> accept, <kbd>r</kbd> reject, drag on the image then <kbd>d</kbd> (or Enter) redraw,
<kbd>s</kbd> skip, <kbd>u</kbd> undo, Escape drops a drawn box.</p>
<nav id="findings"></nav>
<p id="about"></p>
<div>
<button data-verdict="accept">accept (a)</button> <button data-verdict="reject">reject (r)</button>
<button data-verdict="redraw">redraw (d)</button> <button data-verdict="skip">skip (s)</button>
<button id="undo">undo (u)</button> <span id="status" role="status"></span>
</div>
<div id="stage"><img id="image" alt="the box's image" draggable="false">
<div id="released" class="box" hidden></div><div id="drawn" class="box" hidden></div></div>
<script>{_SCRIPT}</script>
</body></html>
"""
