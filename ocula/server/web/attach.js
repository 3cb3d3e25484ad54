// Images attached to the next message: by the file picker, drag and drop onto the page, or paste.
// Each becomes a data: URI (what /v1/chat/completions takes) shown as a removable thumbnail.

export class Attachments {
  // canTake(): null when images may be attached, else the reason they may not (shown to the person)
  constructor(container, { canTake, onRefused }) {
    this.container = container;
    this.canTake = canTake;
    this.onRefused = onRefused;
    this.items = [];
  }

  async add(fileList) {
    const files = [...(fileList || [])];
    if (!files.length) return 0;
    const images = files.filter((f) => f.type.startsWith("image/"));
    const refusal = this.canTake();
    if (refusal) {
      this.onRefused(refusal);
      return 0;
    }
    if (images.length < files.length) {
      const others = files.filter((f) => !f.type.startsWith("image/")).map((f) => f.name || f.type || "a file");
      this.onRefused(`Only images can be attached; not attached: ${others.join(", ")}`);
    }
    for (const file of images) {
      try {
        this.items.push({ name: file.name || "pasted image", url: await readAsDataUrl(file) });
      } catch (e) {
        this.onRefused(`Could not read ${file.name || "the image"}: ${e.message}`);
      }
    }
    this.render();
    return images.length;
  }

  take() {
    const urls = this.items.map((a) => a.url);
    this.items = [];
    this.render();
    return urls;
  }

  render() {
    this.container.replaceChildren(...this.items.map((item, k) => {
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = item.name;
      img.title = item.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = `Remove ${item.name}`;
      remove.addEventListener("click", () => {
        this.items.splice(k, 1);
        this.render();
      });
      thumb.append(img, remove);
      return thumb;
    }));
  }

  // paste anywhere on the page and drops onto `dropZone` attach images; `hint` shows while dragging
  wire(dropZone, hint) {
    document.addEventListener("paste", (e) => {
      const files = [...(e.clipboardData?.files || [])];
      if (!files.some((f) => f.type.startsWith("image/"))) return; // plain text pastes as usual
      e.preventDefault();
      this.add(files);
    });
    let depth = 0;
    const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
    dropZone.addEventListener("dragenter", (e) => {
      if (!hasFiles(e)) return;
      depth++;
      hint.hidden = false;
    });
    dropZone.addEventListener("dragover", (e) => {
      if (hasFiles(e)) e.preventDefault();
    });
    dropZone.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) hint.hidden = true;
    });
    dropZone.addEventListener("drop", (e) => {
      depth = 0;
      hint.hidden = true;
      if (!e.dataTransfer?.files?.length) return;
      e.preventDefault();
      this.add(e.dataTransfer.files);
    });
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error || new Error("read failed"));
    reader.readAsDataURL(file);
  });
}
