// The page: A1111's txt2img / img2img with a task id, its progress polled for the bar and the live preview.
// Cancel aborts the request: the server sees the client go and stops the job at its next step.
"use strict";
const $ = (id) => document.getElementById(id);
let running = null; // {controller, task, timer}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api_key").value || localStorage.getItem("sdxl_api_key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body, signal) {
  const r = await fetch(path, body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.detail || (data.error && data.error.message) || r.status + " " + r.statusText);
  return data;
}

function fmtTime(s) {
  s = Math.max(0, Math.round(s));
  return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
}

async function load() {
  try {
    const [models, samplers, options] = await Promise.all(
      [api("sdapi/v1/sd-models"), api("sdapi/v1/samplers"), api("sdapi/v1/options")]);
    $("model").innerHTML = "";
    for (const m of models) $("model").add(new Option(m.model_name, m.title, false, m.title === options.sd_model_checkpoint));
    for (const s of samplers) $("sampler").add(new Option(s.name, s.name));
    $("status").textContent = "ready";
  } catch (e) {
    $("status").textContent = "not connected: " + e.message;
  }
}

function readFile(file) {
  return new Promise((ok, fail) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.onerror = () => fail(r.error);
    r.readAsDataURL(file);
  });
}

function num(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

async function generate(ev) {
  ev.preventDefault();
  if (running) return;
  if ($("api_key").value) localStorage.setItem("sdxl_api_key", $("api_key").value);
  const task = "page-" + Math.random().toString(16).slice(2) + Date.now().toString(16);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    width: num("width"), height: num("height"), steps: num("steps"), cfg_scale: num("cfg_scale"),
    seed: $("random_seed").checked ? -1 : num("seed"), sampler_name: $("sampler").value || undefined,
    override_settings: { sd_model_checkpoint: $("model").value }, force_task_id: task,
  };
  const file = $("init_image").files[0];
  let route = "sdapi/v1/txt2img";
  if (file) {
    route = "sdapi/v1/img2img";
    body.init_images = [await readFile(file)];
    body.denoising_strength = num("strength");
    if (!body.width || !body.height) { delete body.width; delete body.height; }
  }
  const controller = new AbortController();
  running = { controller, task, timer: setInterval(() => poll(task), 500) };
  $("generate").disabled = true; $("cancel").disabled = false;
  $("error").textContent = ""; $("bar").value = 0; $("eta").textContent = "queued";
  try {
    const res = await api(route, body, controller.signal);
    const info = JSON.parse(res.info);
    $("last_seed").textContent = "seed " + info.all_seeds.join(", ");
    res.images.forEach((b64, i) => addToGallery(b64, info, i, body));
    $("bar").value = 1; $("eta").textContent = info.interrupted ? "interrupted" : "done";
  } catch (e) {
    $("error").textContent = e.name === "AbortError" ? "cancelled" : e.message;
    $("eta").textContent = "";
  } finally {
    clearInterval(running.timer);
    running = null;
    $("generate").disabled = false; $("cancel").disabled = true; $("preview").hidden = true;
  }
}

async function poll(task) {
  if (!running || running.task !== task) return;
  try {
    const p = await api("sdapi/v1/progress?id_task=" + encodeURIComponent(task));
    if (!running || running.task !== task || p.state.id_task !== task) return;
    $("bar").value = p.progress;
    $("eta").textContent = p.state.queue_state === "queued" ? "queued"
      : `step ${p.state.sampling_step}/${p.state.sampling_steps}, ETA ${fmtTime(p.eta_relative)}`;
    if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
  } catch (e) { /* the next poll tries again */ }
}

function addToGallery(b64, info, i, body) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const seed = info.all_seeds[i];
  const card = document.createElement("div");
  card.className = "card";
  card.innerHTML = `<img alt="result"><div class="meta"></div><div class="actions">
    <a class="download">download PNG</a><button type="button" class="reuse">same settings</button></div>`;
  card.querySelector("img").src = url;
  card.querySelector(".meta").textContent = info.infotexts[i];
  const a = card.querySelector(".download");
  a.href = url; a.download = `sdxl-${seed}.png`;
  card.querySelector(".reuse").onclick = () => {
    $("prompt").value = body.prompt; $("negative_prompt").value = body.negative_prompt || "";
    $("width").value = info.width; $("height").value = info.height; $("steps").value = info.steps;
    $("cfg_scale").value = info.cfg_scale; $("seed").value = seed; $("random_seed").checked = false;
    if (info.sampler_name) $("sampler").value = info.sampler_name;
    $("model").value = info.sd_model_name;
  };
  $("gallery").prepend(card);
}

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", () => running && running.controller.abort());
$("clear_image").addEventListener("click", () => { $("init_image").value = ""; });
$("seed").addEventListener("input", () => { $("random_seed").checked = Number($("seed").value) < 0; });
load();
