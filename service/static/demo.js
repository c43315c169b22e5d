// The demo page: plain JavaScript over the public API (no build step, no external assets, strict CSP).
// Its state lives in the address bar, so a picture can be linked and drawn again.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "digitgen-api-key";
let models = [];

function currentModel() {
  return models.find((m) => m.name === $("model").value);
}

// --- the API: a key on 401 (kept for this tab), errors as text ---------------------------------------------
async function api(path) {
  for (;;) {
    const key = sessionStorage.getItem(KEY);
    const response = await fetch(path, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (response.status === 401) {
      const entered = window.prompt("This server needs an API key:");
      if (!entered) throw new Error("an API key is required (the server answered 401)");
      sessionStorage.setItem(KEY, entered.trim());
      continue;
    }
    if (!response.ok) throw new Error(await describe(response));
    return response;
  }
}

async function describe(response) {
  let body;
  try {
    body = await response.json();
  } catch {
    return `${response.status} ${response.statusText}`;
  }
  const detail = body.detail ?? body.error ?? body;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

function showError(text) {
  $("error").textContent = text ? `Error: ${text}` : "";
  $("error").hidden = !text;
}

async function showImage(img, response) {
  const url = URL.createObjectURL(await response.blob());
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the image did not decode"));
    img.src = url;
  });
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = url;
}

// --- state <-> address bar ------------------------------------------------------------------------------
const FIELDS = { model: "model", n: "n", scale: "scale", seed: "seed", "walk-digit": "from",
                 "walk-digit-to": "to", "walk-seed": "wseed", "walk-seed-to": "wseed_to", steps: "steps",
                 "walk-format": "wformat" };

function readState() {
  const query = new URLSearchParams(location.search);
  for (const [id, name] of Object.entries(FIELDS)) {
    if (!query.has(name)) continue;
    const field = $(id), value = query.get(name);
    // a select keeps its default when the link names no option of it (an old or edited link)
    if (field.tagName === "SELECT" && ![...field.options].some((option) => option.value === value)) continue;
    field.value = value;
  }
  return query;
}

function writeState(extra) {
  const query = new URLSearchParams();
  for (const [id, name] of Object.entries(FIELDS)) {
    if ($(id).value !== "") query.set(name, $(id).value);
  }
  const digit = selectedDigit();
  if (digit !== null) query.set("digit", digit);
  for (const [name, value] of Object.entries(extra || {})) query.set(name, value);
  history.replaceState(null, "", `${location.pathname}?${query}`);
}

// --- digits ---------------------------------------------------------------------------------------------
function selectedDigit() {
  const pressed = document.querySelector("#digit-buttons button[aria-pressed='true']");
  return pressed && pressed.dataset.digit !== "" ? pressed.dataset.digit : null;
}

function buildDigitButtons(chosen) {
  const box = $("digit-buttons");
  box.replaceChildren();
  for (const digit of ["", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = digit === "" ? "any" : digit;
    button.dataset.digit = digit;
    button.setAttribute("aria-label", digit === "" ? "any digit" : `digit ${digit}`);
    button.setAttribute("aria-pressed", String(digit === (chosen ?? "")));
    button.addEventListener("click", () => {
      for (const other of box.children) other.setAttribute("aria-pressed", String(other === button));
      draw();
    });
    box.append(button);
  }
}

function updateDigits() {
  const conditional = Boolean(currentModel()?.conditional);
  $("digits").disabled = !conditional;
  $("walk-digit").disabled = $("walk-digit-to").disabled = !conditional;
}

// --- drawing --------------------------------------------------------------------------------------------
async function draw() {
  const params = new URLSearchParams({ model: $("model").value, n: $("n").value, scale: $("scale").value,
                                       nrow: String(Math.min(8, Number($("n").value) || 1)) });
  if ($("seed").value.trim() !== "") params.set("seed", $("seed").value.trim());
  const digit = currentModel()?.conditional ? selectedDigit() : null;
  if (digit !== null) params.set("digit", digit);
  const path = `${digit !== null ? "/generate" : "/sample"}?${params}`;
  $("status").textContent = "drawing...";
  try {
    const response = await api(path);
    $("shown-seed").textContent = response.headers.get("X-Seed");
    await showImage($("grid"), response);
    $("grid").alt = digit !== null ? `${$("n").value} generated images of the digit ${digit}`
                                   : `${$("n").value} generated digits`;
    showError("");
    $("status").textContent = `${response.headers.get("X-Model")}, seed ${response.headers.get("X-Seed")}`;
    writeState();
  } catch (err) {
    showError(err.message);
    $("status").textContent = "";
  }
}

async function walk() {
  const params = new URLSearchParams({ model: $("model").value, steps: $("steps").value, scale: $("scale").value,
                                       format: $("walk-format").value });
  const optional = { digit: "walk-digit", digit_to: "walk-digit-to", seed: "walk-seed", seed_to: "walk-seed-to" };
  for (const [name, id] of Object.entries(optional)) {
    if (!$(id).disabled && $(id).value.trim() !== "") params.set(name, $(id).value.trim());
  }
  try {
    const response = await api(`/interpolate?${params}`);
    await showImage($("walk-image"), response);
    showError("");
    writeState({ walk: "1" });
  } catch (err) {
    showError(err.message);
  }
}

async function start() {
  const query = readState();
  buildDigitButtons(query.get("digit"));
  try {
    models = (await (await api("/models")).json()).models;
  } catch (err) {
    showError(err.message);
    return;
  }
  const wanted = query.get("model");
  for (const m of models) {
    $("model").append(new Option(m.conditional ? `${m.name} (draws the digit you pick)` : m.name, m.name));
  }
  const fallback = models.find((m) => m.default_for.includes("sample")) || models[0];
  $("model").value = models.some((m) => m.name === wanted) ? wanted : fallback?.name;
  updateDigits();
  $("model").addEventListener("change", () => { updateDigits(); draw(); });
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); draw(); });
  $("random-seed").addEventListener("click", () => { $("seed").value = ""; draw(); });
  $("walk").addEventListener("submit", (event) => { event.preventDefault(); walk(); });
  await draw();
  if (query.get("walk") === "1") await walk();
}

start();
