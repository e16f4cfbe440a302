// The page of `scenebreak ui`. It only shows things and asks the server: every mask,
// file, learn and image comes from a library call there (scenebreak/ui/app.py).
"use strict";

const token = document.querySelector('meta[name="token"]').content;
const $ = (id) => document.getElementById(id);
// The colours of the masks' preview (scenebreak/masks/files.py, PALETTE).
const PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 200, 0], [145, 30, 180], [70, 220, 220],
  [245, 130, 48], [240, 50, 230], [128, 128, 0], [0, 128, 128]];

const page = { photo: null, image: null, objects: [], current: -1, nextId: 1, saved: [], cursor: null, drag: null,
  settings: {}, stream: null, maxUpload: Infinity, jobKind: null };

// -- talking to the server -------------------------------------------------------------------------

async function api(path, body) {
  const options = { method: body === undefined ? "GET" : "POST", headers: { "X-Scenebreak-Token": token } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  return answer(await reach(path, options));
}

// A stopped server's page cannot come back by a reload: each start has a new token (and,
// unless --port is given, a new port), so the way back is the address it prints.
const START_AGAIN = "(start it again and open the address it prints)";

// The server's reply, or one readable line when there is none (it was stopped).
async function reach(path, options) {
  try {
    return await fetch(path, options);
  } catch (error) {
    throw new Error(`no answer from scenebreak ui: is it still running? ${START_AGAIN}`);
  }
}

async function answer(response) {
  let data = null;
  try { data = await response.json(); } catch (error) { /* not JSON: said below */ }
  if (!response.ok || data === null) throw new Error((data && data.error) || `the server answered ${response.status} ${response.statusText}`);
  return data;
}

function fileUrl(path) {
  return `/api/file?path=${encodeURIComponent(path)}&token=${encodeURIComponent(token)}`;
}

function showError(error) {
  $("error").textContent = error ? (error.message || String(error)) : "";
  $("error").hidden = !error;
}

function log(text, level) {
  const item = document.createElement("li");
  item.textContent = text;
  if (level === "warning") item.className = "warning";
  $("log").append(item);
  $("log").scrollTop = $("log").scrollHeight;  // the newest line in view, without scrolling the page
}

// Run an action; its one-line error (the command line's) shows at the top.
function act(fn) {
  return async (...args) => {
    showError(null);
    try { await fn(...args); } catch (error) { showError(error); }
  };
}

// -- long actions: progress from the server's event stream -----------------------------------------

// The buttons that start a long action: off while one runs (a second click was a second request).
const STARTERS = ["open", "upload", "learn", "generate"];
// What Cancel says while the job winds down: learn saves a checkpoint, generate ends its pass.
function stopping() {
  return page.jobKind === "learn" ? "stopping (saving a checkpoint first)… " : "stopping after the images being made… ";
}

function busy(on) {
  for (const id of STARTERS) $(id).disabled = on;
}

const finished = {
  // (An upload is saved under a name of the server's: the list shows the photo by it.)
  photo: async (result) => { await loadPhoto(result.photo); await loadPhotos(result.photo.split(/[\\/]/).pop()); },
  learn: (result) => {
    $("learned").textContent = `Learned ${result.handles.join(" ")} in ${result.name} (${result.path})`;
    $("prompt").value = $("prompt").value || `a photo of ${result.handles[0]} on the moon`;
    loadScenes(result.name);
  },
  generate: (result) => {
    for (const image of result.images) {
      const img = document.createElement("img");
      img.src = fileUrl(image.path);
      img.alt = `${image.prompt} (seed ${image.seed})`;
      img.title = image.path;
      $("images").prepend(img);
    }
  },
};

// The job this tab follows, kept across a reload: one that ends while the page reloads is
// still shown (its records are replayed: a learn's scene, a failure and its hint). Kept with
// the server's token: a restarted server numbers its jobs afresh.
const FOLLOWED = "scenebreak:job";

function followed() {
  try {
    const job = JSON.parse(sessionStorage.getItem(FOLLOWED));
    return job && job.token === token ? job : null;
  } catch (error) {
    return null;
  }
}

function watch(job) {
  if (page.stream) page.stream.close();
  sessionStorage.setItem(FOLLOWED, JSON.stringify({ token, id: job.id, kind: job.kind, cancellable: job.cancellable }));
  busy(true);
  page.stopping = false;
  page.jobKind = job.kind;
  $("job").hidden = false;
  $("cancel").hidden = !job.cancellable;
  $("cancel").disabled = false;
  $("job-text").textContent = `${job.kind}: starting`;
  $("job-bar").removeAttribute("value");  // indeterminate until the first progress record
  document.body.dataset.job = "running";
  // This job's records (after a reconnect too, when another may be running by then).
  const stream = new EventSource(`/api/events?token=${encodeURIComponent(token)}&job=${job.id}&after=0`);
  const losses = {};
  page.stream = stream;
  stream.onmessage = (message) => {
    const record = JSON.parse(message.data);
    if (record.type === "progress") {
      // The last loss stays shown: on a GPU only some steps carry one.
      if (record.info && record.info.loss != null) losses[record.task] = record.info.loss;
      const loss = losses[record.task] != null ? ` loss ${losses[record.task].toFixed(4)}` : "";
      $("job-text").textContent = `${page.stopping ? stopping() : ""}${record.task} ${record.completed}/${record.total}${loss}`;
      $("job-bar").max = Math.max(1, record.total);
      $("job-bar").value = record.completed;
      if (record.completed === record.total) log(`${record.task}: ${record.completed}/${record.total}${loss}`);
    } else if (record.type === "message") {
      log(record.text, record.level);
    } else if (record.type === "state") {
      stopWatching(stream, record.state);
      if ((followed() || {}).id === job.id) sessionStorage.removeItem(FOLLOWED);
      $("job-text").textContent = `${record.job}: ${record.state}`;
      if (record.state === "unknown" && job.replayed) {  // ended during the reload, so long ago it is forgotten
        $("job-text").textContent = `${job.kind}: ended while the page reloaded`;
        log(`${job.kind} ended while the page reloaded; its result is no longer known here`, "warning");
      } else if (record.state === "done") {
        $("job-bar").max = 1;
        $("job-bar").value = 1;
        act(async () => finished[record.job](record.result))();
      } else {
        // The command line's line, with the page's own way on; stopped with the server
        // (Ctrl-C, SIGTERM), the page says the server is gone too.
        let said = record.error;
        if (record.job === "learn" && record.state === "cancelled") said += " (here: tick Resume, then Learn)";
        showError(record.server === "stopped" ? `${said}; scenebreak ui has stopped ${START_AGAIN}` : said);
        log(`${record.job} ${record.state}: ${record.error}`, "warning");
        // A cancelled generate's images written so far are shown as a finished one's.
        if (record.state === "cancelled" && record.result && record.job === "generate") {
          act(async () => finished.generate(record.result))();
        }
      }
    }
  };
  // The browser reconnects by itself while the server is there; when it is gone (stopped,
  // or started again with another token) the page says so instead of waiting for ever.
  stream.onerror = async () => {
    try {
      await api("/api/state");
    } catch (error) {
      if (page.stream !== stream) return;
      stopWatching(stream, "lost");
      $("job-text").textContent = `${job.kind}: no answer`;
      showError(new Error(`lost scenebreak ui ${START_AGAIN}; a learn that was running saved its checkpoint: tick ` +
        "Resume"));
    }
  };
}

// The followed job is over (`state`: done, failed, cancelled, or lost): its stream
// closes and the buttons are back.
function stopWatching(stream, state) {
  stream.close();
  page.stream = null;
  busy(false);
  $("cancel").hidden = true;
  document.body.dataset.job = state;
}

async function start(path, body) {
  await startWith(() => api(path, body));
}

// A long action from `request()` (its job), followed; the buttons are off from the click
// (a double click must not send a second request) and back if it is refused.
async function startWith(request) {
  busy(true);
  try {
    watch(await request());
  } catch (error) {
    busy(false);
    throw error;
  }
}

// -- the photo and its objects ------------------------------------------------------------------------

function loadPhoto(path) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => {
      page.photo = path;
      page.image = image;
      page.objects = [];
      page.saved = [];
      page.preview = null;
      $("saved").replaceChildren();
      $("canvas").width = image.naturalWidth;
      $("canvas").height = image.naturalHeight;
      $("photo-name").textContent = `${path} (${image.naturalWidth}x${image.naturalHeight})`;
      fit();
      const kept = recall(storageKey());
      if (kept) {
        act(() => restore(kept))();  // (the masks come back from the server one by one)
      } else {
        addObject();
      }
      resolve();
    };
    // The server's reason (gone since, outside the folders, too big), not just "cannot show".
    image.onerror = async () => {
      let why = "the browser cannot draw it";
      try {
        const response = await reach(fileUrl(path), {});
        if (!response.ok) {
          const data = await response.json().catch(() => null);
          why = (data && data.error) || `the server answered ${response.status}`;
        }
      } catch (error) {
        why = error.message;
      }
      reject(new Error(`cannot show ${path}: ${why}`));
    };
    image.src = fileUrl(path);
  });
}

// The objects of a photo outlive a reload of the page (the tab's own storage): their
// clicks, box, words and names, and the masks last saved; the masks are asked for again.
// The photo as the page keeps its objects: its path and size (another picture saved at
// the same path, of another size, starts afresh).
function storageKey() {
  return `scenebreak:${page.photo}:${page.image.naturalWidth}x${page.image.naturalHeight}`;
}

function remember() {
  if (!page.photo || !page.image) return;
  const objects = page.objects.map(({ id, name, points, labels, box, words }) => ({ id, name, points, labels, box, words }));
  try {
    sessionStorage.setItem(storageKey(), JSON.stringify({ objects, nextId: page.nextId,
      current: page.current, saved: page.saved, preview: page.preview || null }));
  } catch (error) { /* no storage (private mode): nothing kept, nothing lost now */ }
}

function recall(key) {
  try {
    const kept = JSON.parse(sessionStorage.getItem(key));
    return kept && Array.isArray(kept.objects) && kept.objects.length ? kept : null;
  } catch (error) {
    return null;
  }
}

async function restore(kept) {
  const photo = page.photo;
  page.objects = kept.objects.map((o) => ({ ...o, overlay: null, area: 0, score: null }));
  page.nextId = Math.max(kept.nextId || 1, ...page.objects.map((o) => Number(o.id) + 1));
  page.current = Math.min(Math.max(kept.current ?? 0, 0), page.objects.length - 1);
  // The saved files first: they are these objects' masks, and a change made while the
  // masks come back forgets them as any change does.
  if (kept.saved && kept.saved.length) showSaved(kept.saved, kept.preview);
  renderObjects();
  draw();
  let failed = null;
  for (const object of [...page.objects]) {  // (a copy: Delete or Move may change the list meanwhile)
    if (page.photo !== photo) return;  // another photo was opened
    try {
      await requestMask(object, { restoring: true });
    } catch (error) {
      failed = failed || error;  // the others still come back
    }
  }
  if (failed) throw failed;
}

function showSaved(saved, preview) {
  page.saved = saved;
  page.preview = preview;
  const items = [...saved, ...(preview ? [preview] : [])].map((path) => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = fileUrl(path);
    link.target = "_blank";
    link.textContent = path;
    item.append(link);
    return item;
  });
  $("saved").replaceChildren(...items);
  remember();
}

// Show the photo as large as its panel allows (small ones scaled up, pixel by pixel).
function fit() {
  const canvas = $("canvas");
  if (!page.image) return;
  const room = canvas.parentElement.clientWidth;
  const tall = window.innerHeight - canvas.getBoundingClientRect().top - 40;
  const scale = Math.min(room / canvas.width, Math.max(tall, 200) / canvas.height, 8);
  canvas.style.width = `${Math.floor(canvas.width * scale)}px`;
  canvas.style.height = `${Math.floor(canvas.height * scale)}px`;
  canvas.style.imageRendering = scale >= 2 ? "pixelated" : "auto";
}

function addObject() {
  const id = String(page.nextId++);
  page.objects.push({ id, name: `object ${page.objects.length + 1}`, points: [], labels: [], box: null, words: "",
    overlay: null, area: 0, score: null });
  page.current = page.objects.length - 1;
  renderObjects();
  draw();
}

function currentObject() {
  if (!page.image) throw new Error("open a photo first");
  if (page.current < 0) addObject();
  return page.objects[page.current];
}

// Text as one shell word, whatever it holds: pasted, "$(...)" or a quote inside runs nothing.
function shellQuoted(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

// What `scenebreak mask` needs for the same mask (clicks beside an object are the page's own).
function commandFor(object) {
  if (object.words) return `-p ${shellQuoted(object.words)}`;
  const on = object.points.filter((_, i) => object.labels[i] === 1);
  const beside = object.points.filter((_, i) => object.labels[i] === 0);
  if (object.box) return object.points.length ? "a box with clicks: the page only" : `--box ${object.box.join(",")}`;
  return [...on.map(([x, y]) => `--point ${x},${y}`), ...beside.map(([x, y]) => `--exclude ${x},${y}`)].join(" ")
    + (on.length > 1 ? " --group" : "");
}

function renderObjects() {
  const list = $("objects");
  // The list is built again: the control that had the keyboard gets it back afterwards.
  const focused = document.activeElement;
  const had = focused && focused.dataset && focused.dataset.role && focused.closest("#objects li")
    ? { id: focused.closest("li").dataset.id, role: focused.dataset.role, at: focused.selectionStart } : null;
  list.replaceChildren();
  page.objects.forEach((object, index) => {
    const colour = PALETTE[index % PALETTE.length];
    const item = document.createElement("li");
    item.style.setProperty("--swatch", `rgb(${colour.join(",")})`);
    item.className = index === page.current ? "current" : "";
    item.dataset.id = object.id;
    const name = document.createElement("input");
    name.type = "text";
    name.value = object.name;
    name.setAttribute("aria-label", `Name of object ${index + 1}`);
    name.dataset.role = "name";
    name.oninput = () => { object.name = name.value; remember(); };  // kept as typed when the list is built again
    name.onchange = () => { object.name = name.value.trim() || `object ${index + 1}`; };
    name.onfocus = () => select(index);
    const words = document.createElement("input");
    words.type = "text";
    words.placeholder = "or describe it in words";
    words.value = object.wordsTyped ?? object.words;
    words.setAttribute("aria-label", `Words for object ${index + 1}`);
    words.dataset.role = "words";
    words.oninput = () => { object.wordsTyped = words.value; };
    words.onkeydown = (event) => { if (event.key === "Enter") find(); };
    words.onfocus = () => select(index);
    const find = act(async () => {
      object.words = words.value.trim();
      object.points = []; object.labels = []; object.box = null;
      select(index);
      await requestMask(object);
    });
    const tools = document.createElement("div");
    tools.className = "tools";
    const button = (text, label, fn) => {
      const b = document.createElement("button");
      b.type = "button"; b.className = "plain"; b.textContent = text; b.setAttribute("aria-label", label);
      b.dataset.role = text;
      b.onclick = fn;
      tools.append(b);
    };
    button("Select", `Select object ${index + 1} for clicks`, () => { select(index); $("canvas").focus(); });
    button("Find", `Find object ${index + 1} from its words`, find);
    button("↑", `Move object ${index + 1} up`, () => move(index, -1));
    button("↓", `Move object ${index + 1} down`, () => move(index, 1));
    button("Delete", `Delete object ${index + 1}`, () => {
      page.objects.splice(index, 1);
      // The selection stays on the object it was on (one above the deleted one moves up).
      page.current = Math.min(index < page.current ? page.current - 1 : page.current, page.objects.length - 1);
      unsave();
      renderObjects(); draw();
    });
    const facts = document.createElement("div");
    facts.className = "facts";
    facts.textContent = object.overlay
      ? `${object.area} px, score ${object.score.toFixed(2)}; as a command: scenebreak mask … ${commandFor(object)}`
      : "no mask yet: click on it in the photo";
    item.append(name, words, tools, facts);
    list.append(item);
  });
  remember();
  if (had) {
    const again = list.querySelector(`li[data-id="${had.id}"] [data-role="${had.role}"]`);
    if (again) {
      again.focus();
      if (had.at != null && again.setSelectionRange) again.setSelectionRange(had.at, had.at);
    }
  }
}

// Make object `index` the one clicks go to, without rebuilding the list (focus stays where it is).
function select(index) {
  page.current = index;
  [...$("objects").children].forEach((item, i) => item.classList.toggle("current", i === index));
  draw();
}

function move(index, step) {
  const to = index + step;
  if (to < 0 || to >= page.objects.length) return;
  [page.objects[index], page.objects[to]] = [page.objects[to], page.objects[index]];
  page.current = to;
  unsave();
  renderObjects(); draw();
}

// One object's mask requests go one after another, each with the clicks as they are when
// it is sent: sent together, their replies could come back in another order than the
// server kept them, and Save would write another mask than the one shown.
function requestMask(object, how = {}) {
  const next = (object.pending || Promise.resolve()).catch(() => {}).then(() => fetchMask(object, how));
  object.pending = next;
  return next;
}

async function fetchMask(object, how = {}) {
  if (!page.objects.includes(object)) return;  // deleted meanwhile
  if (!object.words && !object.box && !object.labels.includes(1)) {
    object.overlay = null;
    object.area = 0;
  } else {
    const result = await api("/api/mask", { id: object.id, points: object.points, labels: object.labels,
      box: object.box, words: object.words || null, photo: page.photo });
    object.area = result.area;
    object.score = result.score;
    object.overlay = await overlay(result.png);
  }
  if (!how.restoring) unsave();  // (a mask coming back after a reload is no change)
  $("canvas").dataset.masks = String(page.objects.filter((o) => o.overlay).length);
  renderObjects();
  draw();
}

// The saved masks are no longer the ones shown: Learn asks for a new Save.
function unsave() {
  if (!page.saved.length) return;
  page.saved = [];
  page.preview = null;
  $("saved").replaceChildren();
}

// The 0/255 mask PNG as a canvas: white pixels become its colour, the rest transparent.
function overlay(png) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => {
      const layer = document.createElement("canvas");
      layer.width = image.naturalWidth;
      layer.height = image.naturalHeight;
      const context = layer.getContext("2d");
      context.drawImage(image, 0, 0);
      const pixels = context.getImageData(0, 0, layer.width, layer.height);
      for (let i = 0; i < pixels.data.length; i += 4) {
        pixels.data[i + 3] = pixels.data[i] > 127 ? 255 : 0;
        pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = 255;
      }
      context.putImageData(pixels, 0, 0);
      resolve(layer);
    };
    image.onerror = () => reject(new Error("the mask could not be shown"));
    image.src = `data:image/png;base64,${png}`;
  });
}

function draw() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  if (!page.image) return;
  context.globalAlpha = 1;
  context.drawImage(page.image, 0, 0);
  // Photo pixels per screen pixel: marks keep their size on the screen however the photo is shown.
  const scale = canvas.width / Math.max(1, canvas.getBoundingClientRect().width);
  page.objects.forEach((object, index) => {
    if (!object.overlay) return;
    const tinted = document.createElement("canvas");
    tinted.width = canvas.width; tinted.height = canvas.height;
    const t = tinted.getContext("2d");
    t.drawImage(object.overlay, 0, 0);
    t.globalCompositeOperation = "source-in";
    t.fillStyle = `rgb(${PALETTE[index % PALETTE.length].join(",")})`;
    t.fillRect(0, 0, tinted.width, tinted.height);
    context.globalAlpha = 0.5;
    context.drawImage(tinted, 0, 0);
    context.globalAlpha = 1;
  });
  const object = page.objects[page.current];
  if (object) {
    object.points.forEach(([x, y], i) => {
      context.fillStyle = object.labels[i] ? "#18a849" : "#d0021b";
      context.strokeStyle = "#fff";
      context.lineWidth = scale;
      context.beginPath();
      context.arc(x + 0.5, y + 0.5, 4 * scale, 0, 2 * Math.PI);
      context.fill();
      context.stroke();
    });
    if (object.box) {
      const [x0, y0, x1, y1] = object.box;
      context.strokeStyle = "#0b62c4";
      context.lineWidth = 2 * scale;
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
  }
  if (page.drag && page.drag.moved) {
    const { x0, y0, x1, y1 } = page.drag;
    context.setLineDash([6 * scale, 4 * scale]);
    context.strokeStyle = "#0b62c4";
    context.lineWidth = 2 * scale;
    context.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    context.setLineDash([]);
  }
  if (page.cursor && document.activeElement === canvas) {
    const [x, y] = page.cursor;
    context.strokeStyle = "#0b62c4";
    context.lineWidth = scale;
    context.beginPath();
    context.moveTo(x + 0.5 - 8 * scale, y + 0.5); context.lineTo(x + 0.5 + 8 * scale, y + 0.5);
    context.moveTo(x + 0.5, y + 0.5 - 8 * scale); context.lineTo(x + 0.5, y + 0.5 + 8 * scale);
    context.stroke();
  }
}

// A pixel of the photo under the pointer: whole numbers, as one types them for `mask --point X,Y`.
function pixelAt(event) {
  const canvas = $("canvas");
  const rect = canvas.getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) * canvas.width / rect.width);
  const y = Math.floor((event.clientY - rect.top) * canvas.height / rect.height);
  return [Math.min(Math.max(x, 0), canvas.width - 1), Math.min(Math.max(y, 0), canvas.height - 1)];
}

const click = act(async (x, y, label) => {
  const object = currentObject();
  object.words = ""; object.wordsTyped = undefined;
  object.points.push([x, y]);
  object.labels.push(label);
  draw();
  await requestMask(object);
});

function mode() {
  return Number(document.querySelector('input[name="mode"]:checked').value);
}

function setUpCanvas() {
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", (event) => {
    if (!page.image || event.button !== 0) return;
    const [x, y] = pixelAt(event);
    page.drag = { x0: x, y0: y, x1: x, y1: y, sx: event.clientX, sy: event.clientY, moved: false };
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!page.drag) return;
    [page.drag.x1, page.drag.y1] = pixelAt(event);
    page.drag.moved = page.drag.moved || Math.hypot(event.clientX - page.drag.sx, event.clientY - page.drag.sy) > 6;
    if (page.drag.moved) draw();
  });
  canvas.addEventListener("pointerup", act(async (event) => {
    const drag = page.drag;
    page.drag = null;
    if (!drag) return;
    if (!drag.moved) {
      await click(drag.x0, drag.y0, event.shiftKey ? 0 : mode());
      return;
    }
    const object = currentObject();
    const [x1, y1] = pixelAt(event);
    // A box's far corner is the pixel's far edge: a box over pixels 10..20 is 10,10,21,21.
    object.box = [Math.min(drag.x0, x1), Math.min(drag.y0, y1), Math.max(drag.x0, x1) + 1, Math.max(drag.y0, y1) + 1];
    object.words = ""; object.wordsTyped = undefined;
    draw();
    await requestMask(object);
  }));
  canvas.addEventListener("pointercancel", () => { page.drag = null; draw(); });  // (a touch taken by the system)
  canvas.addEventListener("keydown", (event) => {
    if (!page.image) return;
    const step = event.altKey ? 1 : Math.max(1, Math.round(canvas.width / 50));
    const [x, y] = page.cursor || [Math.floor(canvas.width / 2), Math.floor(canvas.height / 2)];
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[event.key]) {
      page.cursor = [Math.min(Math.max(x + moves[event.key][0], 0), canvas.width - 1),
        Math.min(Math.max(y + moves[event.key][1], 0), canvas.height - 1)];
    } else if (event.key === "Enter" || event.key === " ") {
      click(x, y, event.shiftKey ? 0 : mode());
    } else if (event.key === "n" || event.key === "N") {
      click(x, y, 0);
    } else if (event.key === "Backspace") {
      undo();
    } else {
      return;
    }
    page.cursor = page.cursor || [x, y];
    event.preventDefault();
    draw();
  });
  canvas.addEventListener("focus", () => { page.cursor = page.cursor || [Math.floor(canvas.width / 2), Math.floor(canvas.height / 2)]; draw(); });
  canvas.addEventListener("blur", draw);
}

const undo = act(async () => {
  const object = currentObject();
  if (object.points.length) {
    object.points.pop();
    object.labels.pop();
  } else {
    object.box = null;
  }
  await requestMask(object);
});

// -- the settings forms, from the same fields as the command line's options -----------------------

function buildSettings(container, fields, skip) {
  const inputs = {};
  for (const field of fields) {
    if (skip.includes(field.name)) continue;
    const id = `${container.id}-${field.name}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = field.flag;
    label.title = field.help || "";
    let input;
    if (field.kind === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = field.default;
      label.prepend(input);
    } else if (field.kind === "choice") {
      input = document.createElement("select");
      const choices = field.default == null ? ["", ...field.choices] : field.choices;
      for (const choice of choices) {
        const option = document.createElement("option");
        option.value = choice;
        option.textContent = choice || "(default)";
        option.selected = choice === (field.default ?? "");
        input.append(option);
      }
    } else {
      input = document.createElement("input");
      input.type = "text";
      input.placeholder = field.default == null ? "(default)" : String(Array.isArray(field.default) ? field.default.join(" ") : field.default);
    }
    input.id = id;
    input.title = field.help || "";
    // What was set before a reload of the page comes back (the tab's own storage).
    const kept = keptSetting(id);
    if (kept !== undefined) {
      if (field.kind === "bool") input.checked = kept; else input.value = kept;
    }
    input.addEventListener("change", () => keepSetting(id, field.kind === "bool" ? input.checked : input.value));
    container.append(label);
    if (field.kind !== "bool") container.append(input);
    inputs[field.name] = { input, field };
  }
  return inputs;
}

// The options set on this tab ({input id: value}; {} where there is no storage).
function keptSettings() {
  try {
    return JSON.parse(sessionStorage.getItem("scenebreak:settings") || "{}") || {};
  } catch (error) {
    return {};
  }
}

function keptSetting(id) {
  const all = keptSettings();
  return Object.prototype.hasOwnProperty.call(all, id) ? all[id] : undefined;
}

function keepSetting(id, value) {
  const all = keptSettings();
  all[id] = value;
  try {
    sessionStorage.setItem("scenebreak:settings", JSON.stringify(all));
  } catch (error) { /* no storage: the setting lives until the reload */ }
}

// A field of the page kept in the tab's storage as the options are, and put back from it.
function keepField(input) {
  const box = input.type === "checkbox";
  const kept = keptSetting(input.id);
  if (kept !== undefined) {
    if (box) input.checked = kept; else input.value = kept;
  }
  input.addEventListener(box ? "change" : "input", () => keepSetting(input.id, box ? input.checked : input.value));
}

// Only what was changed: the rest keeps the library's defaults.
function settingsOf(inputs) {
  const values = {};
  for (const [name, { input, field }] of Object.entries(inputs)) {
    if (field.kind === "bool") {
      if (input.checked !== field.default) values[name] = input.checked;
    } else if (input.value.trim() !== "" && input.value !== (field.default ?? "")) {
      values[name] = input.value.trim();
    }
  }
  return values;
}

// -- lists ------------------------------------------------------------------------------------------------

async function loadPhotos(selected) {
  const data = await api("/api/photos");
  const list = $("photo-list");
  list.replaceChildren(...data.photos.map((name) => new Option(name, name, false, name === selected)));
}

async function loadScenes(selected) {
  const data = await api("/api/scenes");
  const list = $("scene");
  const rows = data.scenes.filter((row) => !row.error);
  list.replaceChildren(...rows.map((row) => new Option(`${row.name} (${row.handles.join(" ")})`, row.name, false,
    row.name === selected)));
  if (selected) list.value = selected;
}

// -- the buttons ------------------------------------------------------------------------------------------

function setUpButtons() {
  $("open").onclick = act(() => start("/api/open", { path: $("photo-list").value }));
  $("upload").onchange = act(async () => {
    const file = $("upload").files[0];
    if (!file) return;
    $("upload").value = "";  // the same file chosen again (after a refusal) is a change too
    // Said here: the server refuses a bigger one unread, and the browser then reports a lost connection.
    if (file.size > page.maxUpload) throw new Error(`${file.name} is over ${page.maxUpload >> 20} MB: make it smaller first`);
    await startWith(async () => answer(await reach(`/api/upload?name=${encodeURIComponent(file.name)}`, {
      method: "POST", headers: { "X-Scenebreak-Token": token, "Content-Type": "application/octet-stream" },
      body: file })));
  });
  $("add").onclick = act(async () => { currentObject(); addObject(); $("canvas").focus(); });
  $("undo").onclick = undo;
  $("save").onclick = act(async () => {
    const objects = page.objects.filter((o) => o.overlay).map((o) => ({ id: o.id, name: o.name }));
    const run = await api("/api/save", { objects, out_dir: $("out-dir").value.trim() || null, photo: page.photo });
    showSaved(run.masks.map((m) => m.path), run.preview);
    for (const warning of run.overlaps) log(`masks ${warning.masks.join(" and ")} overlap (${Math.round(warning.fraction * 100)}%)`, "warning");
  });
  $("learn").onclick = act(() => start("/api/learn", {
    photo: page.photo, masks: page.saved, name: $("scene-name").value.trim() || null, base_model: $("base-model").value.trim() || null,
    resume: $("resume").checked, force: $("force").checked, settings: settingsOf(page.settings.learn) }));
  $("cancel").onclick = act(async () => {
    $("cancel").disabled = true;
    page.stopping = true;
    $("job-text").textContent = stopping();
    try {
      await api("/api/cancel", {});
    } catch (error) {  // not stopping after all: the button is back, the line says why
      $("cancel").disabled = false;
      page.stopping = false;
      throw error;
    }
  });
  $("refresh").onclick = act(() => loadScenes($("scene").value));
  $("generate").onclick = act(() => start("/api/generate", {
    scene: $("scene").value, prompt: $("prompt").value, settings: settingsOf(page.settings.generate) }));
  $("prompt").onkeydown = (event) => { if (event.key === "Enter") $("generate").click(); };
}

window.addEventListener("resize", fit);

window.addEventListener("DOMContentLoaded", act(async () => {
  setUpCanvas();
  setUpButtons();
  const state = await api("/api/state");
  page.maxUpload = state.max_upload_bytes;
  page.settings.learn = buildSettings($("learn-settings"), state.settings.learn, []);
  page.settings.generate = buildSettings($("generate-settings"), state.settings.generate, []);
  $("base-model").value = state.base_model;
  // The learn fields, the folder and the prompt come back after a reload as the options
  // do: a reload during a learn lost the scene's name, and Resume then looked for another.
  for (const id of ["scene-name", "base-model", "resume", "force", "out-dir", "prompt"]) keepField($(id));
  if (state.out_dir) $("out-dir").placeholder = state.out_dir;
  const name = state.photo ? state.photo.split(/[\\/]/).pop() : null;
  await Promise.all([loadPhotos(name), loadScenes()]);
  // A reload while something runs: the open photo back, and the job's progress followed;
  // the job this tab followed, if it ended meanwhile, shown as it ended (a photo's is shown
  // by the photo itself).
  if (state.ready) await loadPhoto(state.photo);
  const mine = followed();
  if (state.job && state.job.state === "running") {
    watch(state.job);
  } else if (mine && !(mine.kind === "photo" && state.ready)) {
    watch({ ...mine, replayed: true });
  } else if (!state.ready && state.photo) {
    await start("/api/open", { path: state.photo });
  }
  document.body.dataset.loaded = "yes";
}));
