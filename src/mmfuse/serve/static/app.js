// The page of `mmfuse serve`: pick or upload an image, ask, show the answer, top-5 bars and the attention map.
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = null; // the Blob of the chosen image

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function choose(blob, url) {
  chosen = blob;
  $("preview").src = url;
  $("preview").hidden = false;
  $("no-image").hidden = true;
  showError("");
}

async function loadInfo() {
  try {
    const info = await (await fetch("/healthz")).json();
    $("model-info").textContent = `mmfuse ${info.kind} model: fusion ${info.fusion}, ${info.num_answers} answers, ` +
      `${info.image_size}x${info.image_size} images`;
  } catch (e) { /* the page works without it */ }
}

async function loadExamples() {
  const examples = await (await fetch("/v1/examples")).json();
  for (const ex of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = ex.question;
    const img = document.createElement("img");
    img.src = ex.url;
    img.alt = `example: ${ex.question}`;
    button.appendChild(img);
    button.addEventListener("click", async () => {
      const blob = await (await fetch(ex.url)).blob();
      choose(blob, ex.url);
      document.querySelectorAll(".examples button").forEach((b) => b.classList.remove("chosen"));
      button.classList.add("chosen");
      if (!$("question").value) $("question").value = ex.question;
    });
    $("examples").appendChild(button);
  }
}

function showResult(result) {
  const top = result.top_k || [];
  $("answer").textContent = result.answer ?? result.caption ?? "";
  $("confidence").textContent = top.length ? `${(100 * top[0][1]).toFixed(1)}%` : "";
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of top.slice(0, 5)) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${Math.max(0.5, 100 * p)}%`;
    track.appendChild(fill);
    const pct = document.createElement("span");
    pct.className = "p";
    pct.textContent = `${(100 * p).toFixed(1)}%`;
    li.append(label, track, pct);
    bars.appendChild(li);
  }
  if (result.attention_png) {
    $("attention-map").src = `data:image/png;base64,${result.attention_png}`;
    $("attention-block").hidden = false;
  } else {
    $("attention-block").hidden = true;
  }
  $("result").hidden = false;
}

async function ask(event) {
  event.preventDefault();
  if (!chosen) { showError("Choose an image first: upload one or pick an example."); return; }
  const question = $("question").value.trim();
  if (!question) { showError("Type a question about the image."); return; }
  const form = new FormData();
  form.append("image", chosen, "image");
  form.append("question", question);
  form.append("top_k", "5");
  form.append("attention", $("attention").checked ? "true" : "false");
  $("submit").disabled = true;
  showError("");
  try {
    const response = await fetch("/v1/predict", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) { showError(body.detail || `error ${response.status}`); return; }
    showResult(body);
  } catch (e) {
    showError(`The server did not answer (${e}).`);
  } finally {
    $("submit").disabled = false;
  }
}

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (file) {
    document.querySelectorAll(".examples button").forEach((b) => b.classList.remove("chosen"));
    choose(file, URL.createObjectURL(file));
  }
});
$("ask").addEventListener("submit", ask);
loadInfo();
loadExamples();
