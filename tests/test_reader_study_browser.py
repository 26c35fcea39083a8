"""The reader-study page, driven end to end in headless Chromium through its own controls.

Chromium is Debian's /usr/bin/chromium (`.ci/run` installs it). We talk to it with the Chrome
DevTools Protocol over `--remote-debugging-pipe` (NUL-separated JSON on fds 3 and 4), so the test
needs no driver, no extra Python package and no network.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brain_ldm_jax import reader_study
from brain_ldm_jax.reader_study import score as score_lib

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1000,700")


def _high_fd(fd: int) -> int:
  high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
  os.close(fd)
  return high


class Browser:
  """A headless Chromium and a minimal CDP client over the debugging pipe."""

  def __init__(self, profile_dir: str):
    cmd_r, cmd_w = os.pipe()  # we write commands; Chromium reads them on fd 3
    ev_r, ev_w = os.pipe()  # Chromium writes replies and events on fd 4
    # Lift the child's ends above 9 so that moving them onto 3 and 4 cannot clobber either.
    cmd_r, ev_w = (_high_fd(fd) for fd in (cmd_r, ev_w))
    args = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}",
            "--remote-debugging-pipe", "about:blank"]
    # bash (not dash: it takes fds above 9) moves our pipe ends onto the fds Chromium expects,
    # then becomes Chromium.
    self.proc = subprocess.Popen(
        ["bash", "-c", f'exec "$@" 3<&{cmd_r} 4>&{ev_w}', "bash", *args],
        pass_fds=(cmd_r, ev_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    os.close(cmd_r)
    os.close(ev_w)
    self._out = os.fdopen(cmd_w, "wb", buffering=0)
    self._in = ev_r
    self._next_id = 0
    self._replies: dict[int, dict] = {}
    self._cond = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()
    target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    self.session = self.call("Target.attachToTarget",
                             {"targetId": target, "flatten": True})["sessionId"]

  def _read(self):
    buf = b""
    while True:
      chunk = os.read(self._in, 1 << 16)
      if not chunk:
        break
      buf += chunk
      *messages, buf = buf.split(b"\0")
      for raw in messages:
        msg = json.loads(raw)
        if "id" in msg:
          with self._cond:
            self._replies[msg["id"]] = msg
            self._cond.notify_all()

  def call(self, method: str, params: dict | None = None, session: bool = False,
           timeout: float = 30.0) -> dict:
    self._next_id += 1
    msg = {"id": self._next_id, "method": method, "params": params or {}}
    if session:
      msg["sessionId"] = self.session
    self._out.write(json.dumps(msg).encode() + b"\0")
    deadline = time.monotonic() + timeout
    with self._cond:
      while self._next_id not in self._replies:
        if not self._cond.wait(deadline - time.monotonic()) and time.monotonic() > deadline:
          raise TimeoutError(f"no reply to {method}")
      reply = self._replies.pop(self._next_id)
    if "error" in reply:
      raise RuntimeError(f"{method}: {reply['error']}")
    return reply.get("result", {})

  def eval(self, expression: str):
    result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                       session=True)
    if "exceptionDetails" in result:
      raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")

  def wait_for(self, expression: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      value = self.eval(expression)
      if value:
        return value
      time.sleep(0.05)
    raise TimeoutError(f"page never satisfied {expression}")

  def open(self, url: str):
    self.call("Page.navigate", {"url": url}, session=True)
    self.wait_for("document.documentElement?.dataset.ready === '1'")

  def reload(self):
    self.eval("window.__before_reload = 1")
    self.call("Page.reload", {}, session=True)
    self.wait_for("!window.__before_reload && document.documentElement?.dataset.ready === '1'")

  def press(self, key: str):
    """A real key press (keyDown with text, keyUp), as the keyboard would send it."""
    codes = {"ArrowLeft": 37, "ArrowRight": 39, "Enter": 13}
    down = {"type": "keyDown", "key": key}
    if key in codes:
      down["windowsVirtualKeyCode"] = codes[key]
    else:
      down.update(text=key, windowsVirtualKeyCode=ord(key.upper()))
    self.call("Input.dispatchKeyEvent", down, session=True)
    self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key}, session=True)

  def click(self, selector: str):
    """A real mouse click at the centre of the element `selector`."""
    box = self.eval(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                    ".getBoundingClientRect();"
                    " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
      self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                             "button": "left", "clickCount": 1}, session=True)

  def type_text(self, text: str):
    self.call("Input.insertText", {"text": text}, session=True)

  def close(self):
    try:
      self.call("Browser.close", timeout=5)
    except (RuntimeError, TimeoutError, OSError):
      pass  # already gone, or stuck: the kill below handles it
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self._out.close()
    self._reader.join(timeout=5)  # it ends at end-of-file, once Chromium has gone
    if not self._reader.is_alive():
      os.close(self._in)


def _blob(seed: int, smoothness: float) -> np.ndarray:
  """A 24^3 'head': an ellipsoid with smooth texture; the two classes differ in smoothness."""
  rng = np.random.default_rng(seed)
  grid = np.mgrid[:24, :24, :24].astype(np.float32) - 11.5
  radius = np.sqrt((grid[0] / 9) ** 2 + (grid[1] / 10) ** 2 + (grid[2] / 8) ** 2)
  texture = ndimage.gaussian_filter(rng.normal(size=(24, 24, 24)), smoothness)
  return np.clip((radius < 1) * 0.7 + 0.5 * texture, 0, None).astype(np.float32)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  for cls, smooth in (("real", 1.0), ("synthetic", 2.0)):
    folder = root / f"{cls}_in" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
      nib.save(nib.Nifti1Image(_blob(i + (100 if cls == "real" else 0), smooth),
                               np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / f"{cls}_{i}.nii.gz"))
  result = reader_study.make_study(str(root / "real_in"), str(root / "synthetic_in"),
                                   str(root / "out"), num_trials=8, seed=3, display_size=64)
  with open(result["key"]) as f:
    key = json.load(f)
  with open(result["page"]) as f:
    text = f.read()
  start = text.index('id="study-data">') + len('id="study-data">')
  payload = json.loads(text[start:text.index("</script>", start)])
  return {"root": root, "key": key, "key_path": result["key"], "page": result["page"],
          "study_id": result["study_id"], "payload": payload}


@pytest.fixture
def browser(tmp_path):
  if CHROMIUM is None:
    pytest.fail("chromium is not installed (apt-get install chromium); .ci/run installs it")
  b = Browser(str(tmp_path / "profile"))
  yield b
  b.close()


def _shown_index(b: Browser) -> int:
  """Which trial the page shows, read from its own progress text ('Trial i of N ...')."""
  text = b.eval("document.getElementById('progress-text').textContent")
  return int(text.split()[1]) - 1


def _answer_current(b, study, invert, confidence, use_keys):
  trial = study["payload"]["trials"][_shown_index(b)]
  truth = {t["id"]: t["truth"] for t in study["key"]["trials"]}[trial["id"]]
  answer = {"real": "synthetic", "synthetic": "real"}[truth] if invert else truth
  if use_keys:
    b.press("s" if answer == "synthetic" else "r")
    b.press(str(confidence))
  else:
    b.click(f'button.answer[data-answer="{answer}"]')
    b.click(f'button.conf[data-conf="{confidence}"]')
  return trial["id"], answer


def _export(b, download_dir, name):
  """Click Export and return the downloaded answers (moved to `name` beside the downloads)."""
  b.click("#export")
  deadline = time.monotonic() + 15
  while time.monotonic() < deadline:
    done = glob.glob(os.path.join(download_dir, "*.json"))  # .crdownload until complete
    if done:
      path = os.path.join(os.path.dirname(download_dir), name)
      time.sleep(0.1)
      os.replace(done[0], path)  # so that the next export is a new file here
      with open(path) as f:
        return path, json.load(f)
    time.sleep(0.05)
  raise TimeoutError("no answers file was downloaded")


def test_page_answers_reload_export_and_score(study, browser, tmp_path):
  b = browser
  downloads = str(tmp_path / "downloads")
  os.makedirs(downloads)
  b.call("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": downloads})
  b.open("file://" + os.path.abspath(study["page"]))
  n = len(study["payload"]["trials"])
  assert b.eval("document.querySelectorAll('#view img').length") >= 1
  b.click("#reader")
  b.type_text("Dr Test")
  b.press("Enter")  # leaves the name field so that the shortcuts reach the page

  given = {}
  for i in range(n // 2):  # first half by keyboard
    tid, answer = _answer_current(b, study, invert=False, confidence=1 + i % 5, use_keys=True)
    given[tid] = (answer, 1 + i % 5)
  assert _shown_index(b) == n // 2

  b.reload()  # answers, position and name survive
  assert f"{n // 2} answered" in b.eval("document.getElementById('progress-text').textContent")
  assert _shown_index(b) == n // 2
  assert b.eval("document.getElementById('reader').value") == "Dr Test"

  for i in range(n // 2, n):  # second half with the buttons
    tid, answer = _answer_current(b, study, invert=False, confidence=1 + i % 5, use_keys=False)
    given[tid] = (answer, 1 + i % 5)
  assert f"{n} answered" in b.eval("document.getElementById('progress-text').textContent")

  path, exported = _export(b, downloads, "correct.json")
  assert exported["study_id"] == study["study_id"] and exported["reader"] == "Dr Test"
  assert {a["trial_id"]: (a["answer"], a["confidence"]) for a in exported["answers"]} == given
  assert all(a["shown_at"] and a["answered_at"] for a in exported["answers"])
  result = score_lib.score(study["key"], [exported])
  assert result["readers"][0]["overall"]["accuracy"] == 1.0
  assert result["readers"][0]["overall"]["n"] == n

  # Revise every answer to the key's inverse: back to the start with the arrow key, then answer.
  for _ in range(n):
    b.press("ArrowLeft")
  assert _shown_index(b) == 0
  for _ in range(n):
    _answer_current(b, study, invert=True, confidence=3, use_keys=True)
  _, inverted = _export(b, downloads, "inverse.json")
  result = score_lib.score(study["key"], [exported, inverted])
  assert result["readers"][1]["overall"]["accuracy"] == 0.0
  assert result["readers"][1]["overall"]["distinguishable"]  # 0 of 8: p = 2 / 256
  assert result["pooled"]["overall"]["accuracy"] == 0.5
  assert not result["pooled"]["overall"]["distinguishable"]

  # The scoring command reads the same files and agrees.
  out = tmp_path / "scores.json"
  assert score_lib.main(["--key", study["key_path"], path, "--out", str(out)]) == 0
  with open(out) as f:
    assert json.load(f)["readers"][0]["overall"]["accuracy"] == 1.0

