"""An edgefl protocol v1 device for MicroPython: umqtt.simple, small chunks, no numpy.

It speaks the same wire protocol as the Python agent and the C example
(docs/protocol.md): presence with a retained status and a last will, a persistent
session, tasks, a chunked model download checked against its SHA-256, the canonical
softmax training in pure Python, and a chunked upload that resumes after a reconnect.

The shuffle is numpy's ``default_rng([seed, round]).permutation(n)`` re-implemented
(SeedSequence + PCG64 + numpy's rejection sampler) on Python's big integers, so this
device's updates equal the numpy reference's: a mixed fleet reproduces the reference run.

It runs on MicroPython (ESP32 and other ports with long integers and floats) and on
CPython 3.9+ (the tests run it there, with a umqtt.simple shim over paho).
"""

import struct
import time

try:  # MicroPython
    import uhashlib as hashlib
except ImportError:  # CPython
    import hashlib

try:
    from os import urandom
except ImportError:  # some ports have no os.urandom
    urandom = None

from math import exp, log

from umqtt.simple import MQTTClient

AGENT = "edgefl-micropython/0.1.0"
# Deadlines and statuses are Unix time. Embedded MicroPython ports count from 2000: add the
# difference (and set the clock with ntptime.settime() at boot).
_EPOCH = 946684800 if time.gmtime(0)[0] == 2000 else 0


def now():
    return time.time() + _EPOCH


MIN_CHUNK = 1024

# ---- CBOR (RFC 8949): the subset protocol v1 uses ---------------------------------------


class Tag:
    """A CBOR tag: ``Tag(40, [shape, Tag(86, bytes)])`` is a float64 tensor."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value


def _head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if n < 0x100000000:
        return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


def dumps(obj):
    """Encode ``obj`` (dict, list, str, bytes, int, float, bool, None, Tag) as CBOR."""
    out = []
    _enc(obj, out)
    return b"".join(out)


def _enc(obj, out):
    if obj is True or obj is False:
        out.append(b"\xf5" if obj else b"\xf4")
    elif obj is None:
        out.append(b"\xf6")
    elif isinstance(obj, int):
        out.append(_head(0, obj) if obj >= 0 else _head(1, -1 - obj))
    elif isinstance(obj, float):
        out.append(b"\xfb" + struct.pack(">d", obj))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        out.append(_head(2, len(obj)))
        out.append(bytes(obj))
    elif isinstance(obj, str):
        b = obj.encode()
        out.append(_head(3, len(b)))
        out.append(b)
    elif isinstance(obj, (list, tuple)):
        out.append(_head(4, len(obj)))
        for v in obj:
            _enc(v, out)
    elif isinstance(obj, dict):
        out.append(_head(5, len(obj)))
        for k, v in obj.items():
            _enc(k, out)
            _enc(v, out)
    elif isinstance(obj, Tag):
        out.append(_head(6, obj.tag))
        _enc(obj.value, out)
    else:
        raise ValueError("cannot encode %r" % (type(obj),))


def _half(h):
    exp_, frac = (h >> 10) & 0x1F, h & 0x3FF
    if exp_ == 0:
        val = frac * 2.0**-24
    elif exp_ == 31:
        val = float("nan") if frac else float("inf")
    else:
        val = (1024 + frac) * 2.0 ** (exp_ - 25)
    return -val if h & 0x8000 else val


def loads(data):
    """Decode one CBOR data item; raises ValueError on malformed or truncated input."""
    try:
        val, _ = _dec(memoryview(data), 0, 0)
    except (IndexError, struct.error) as exc:
        raise ValueError("truncated CBOR") from exc
    return val


def _dec(b, pos, depth):
    if depth > 32:
        raise ValueError("CBOR nested too deeply")
    ib = b[pos]
    major, info = ib >> 5, ib & 31
    pos += 1
    if major == 7:
        if info == 20:
            return False, pos
        if info == 21:
            return True, pos
        if info == 22:
            return None, pos
        if info == 25:
            return _half(struct.unpack(">H", b[pos : pos + 2])[0]), pos + 2
        if info == 26:
            return struct.unpack(">f", b[pos : pos + 4])[0], pos + 4
        if info == 27:
            return struct.unpack(">d", b[pos : pos + 8])[0], pos + 8
        raise ValueError("unsupported CBOR simple value %d" % info)
    if info < 24:
        n = info
    elif info == 24:
        n, pos = b[pos], pos + 1
    elif info == 25:
        n, pos = struct.unpack(">H", b[pos : pos + 2])[0], pos + 2
    elif info == 26:
        n, pos = struct.unpack(">I", b[pos : pos + 4])[0], pos + 4
    elif info == 27:
        n, pos = struct.unpack(">Q", b[pos : pos + 8])[0], pos + 8
    else:
        raise ValueError("indefinite lengths are not supported")
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major in (2, 3):
        if pos + n > len(b):
            raise ValueError("truncated CBOR string")
        raw = bytes(b[pos : pos + n])
        return (raw if major == 2 else raw.decode()), pos + n
    if major == 4:
        items = []
        for _ in range(n):
            v, pos = _dec(b, pos, depth + 1)
            items.append(v)
        return items, pos
    if major == 5:
        m = {}
        for _ in range(n):
            k, pos = _dec(b, pos, depth + 1)
            v, pos = _dec(b, pos, depth + 1)
            m[k] = v
        return m, pos
    v, pos = _dec(b, pos, depth + 1)  # major 6: a tag
    return Tag(n, v), pos


# ---- numpy's default_rng([seed, round]).permutation(n) ------------------------------------

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_M128 = (1 << 128) - 1
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645


class PCG64:
    """numpy's PCG64 seeded through SeedSequence from a list of small non-negative ints."""

    def __init__(self, entropy):
        hc = [0x43B0D7E5]

        def hashmix(v):
            v = (v ^ hc[0]) & _M32
            hc[0] = (hc[0] * 0x931E8875) & _M32
            v = (v * hc[0]) & _M32
            return v ^ (v >> 16)

        def mix(x, y):
            r = (0xCA01F9DD * x - 0x4973F715 * y) & _M32
            return r ^ (r >> 16)

        pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(4)]
        for s in range(4):
            for d in range(4):
                if s != d:
                    pool[d] = mix(pool[d], hashmix(pool[s]))
        for e in entropy[4:]:
            for d in range(4):
                pool[d] = mix(pool[d], hashmix(e))
        words, h = [], 0x8B51F9DD
        for i in range(8):
            v = (pool[i % 4] ^ h) & _M32
            h = (h * 0x58F38DED) & _M32
            v = (v * h) & _M32
            words.append(v ^ (v >> 16))
        v64 = [words[2 * i] | words[2 * i + 1] << 32 for i in range(4)]
        self.inc = ((v64[2] << 64 | v64[3]) << 1 | 1) & _M128
        self.state = 0
        self._step()
        self.state = (self.state + (v64[0] << 64 | v64[1])) & _M128
        self._step()
        self._half = None

    def _step(self):
        self.state = (self.state * _PCG_MULT + self.inc) & _M128

    def next64(self):
        self._step()
        hi = self.state >> 64
        x, rot = (hi ^ (self.state & _M64)), hi >> 58
        return ((x >> rot) | (x << ((64 - rot) & 63))) & _M64

    def next32(self):
        if self._half is not None:
            v, self._half = self._half, None
            return v
        v = self.next64()
        self._half = v >> 32
        return v & _M32

    def interval(self, mx):
        """numpy's random_interval: uniform in [0, mx] by masked rejection."""
        if mx == 0:
            return 0
        mask = mx
        for s in (1, 2, 4, 8, 16, 32):
            mask |= mask >> s
        draw = self.next32 if mx <= _M32 else self.next64
        while True:
            v = draw() & mask
            if v <= mx:
                return v

    def permutation(self, n):
        p = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.interval(i)
            p[i], p[j] = p[j], p[i]
        return p


# ---- data, tensors and the canonical softmax training -------------------------------------


def load_data(path):
    """Read an EFLD v1 file (firmware_examples/c/README.md): returns (rows of floats, labels)."""
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) != 16 or head[:4] != b"EFLD" or struct.unpack("<I", head[4:8])[0] != 1:
            raise ValueError("%s is not an EFLD v1 data file" % path)
        n, d = struct.unpack("<II", head[8:16])
        X = [list(struct.unpack("<%dd" % d, f.read(8 * d))) for _ in range(n)]
        y = list(struct.unpack("<%di" % n, f.read(4 * n))) if n else []
    return X, y


def decode_model(blob):
    """A softmax model {W: float64 [d, k], b: float64 [k]} -> (W rows, b, d, k)."""
    tensors = loads(blob)
    if not isinstance(tensors, dict) or sorted(tensors) != ["W", "b"]:
        raise ValueError("unsupported model: this device trains softmax {W, b}")
    out = {}
    for name, t in tensors.items():
        if not (isinstance(t, Tag) and t.tag == 40 and len(t.value) == 2):
            raise ValueError("tensor %s is not an RFC 8746 array" % name)
        shape, typed = t.value
        if not (isinstance(typed, Tag) and typed.tag == 86 and isinstance(typed.value, bytes)):
            raise ValueError("tensor %s is not float64 little-endian" % name)
        count = 1
        for s in shape:
            count *= s
        if len(typed.value) != 8 * count:
            raise ValueError("tensor %s has the wrong byte count" % name)
        out[name] = (shape, list(struct.unpack("<%dd" % count, typed.value)))
    (ws, w), (bs, b) = out["W"], out["b"]
    if len(ws) != 2 or len(bs) != 1 or bs[0] != ws[1]:
        raise ValueError("unsupported model: need W [d, k] and b [k]")
    d, k = ws
    return [w[j * k : (j + 1) * k] for j in range(d)], b, d, k


def encode_tensors(W, b):
    d, k = len(W), len(b)
    flat = [v for row in W for v in row]
    return {
        "W": Tag(40, [[d, k], Tag(86, struct.pack("<%dd" % (d * k), *flat))]),
        "b": Tag(40, [[k], Tag(86, struct.pack("<%dd" % k, *b))]),
    }


def _softmax_row(z):
    m = z[0]
    for v in z:
        if v > m:
            m = v
    e = [exp(v - m) for v in z]
    s = 0.0
    for v in e:
        s += v
    return [v / s for v in e]


def _logits(W, b, x):
    k = len(b)
    z = [0.0] * k
    for j, xj in enumerate(x):
        row = W[j]
        for c in range(k):
            z[c] += xj * row[c]
    return [z[c] + b[c] for c in range(k)]


def train(W, b, X, y, seed, round_, lr=0.1, batch_size=32, epochs=1, mu=0.0):
    """Minibatch SGD exactly as the digits protocol's step 6; W and b are updated in place.

    ``mu > 0`` adds FedProx's proximal term: each gradient gets ``mu * (w - w_global)``,
    where w_global is the model the task named (protocol 4.1a).
    """
    n, k = len(y), len(b)
    W0, b0 = ([row[:] for row in W], b[:]) if mu > 0 else (None, None)
    rng = PCG64([seed, round_])
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            B = len(idx)
            P = []
            for i in idx:
                p = _softmax_row(_logits(W, b, X[i]))
                p[y[i]] -= 1.0
                P.append([v / B for v in p])
            for j in range(len(W)):
                g = [0.0] * k
                for r, i in enumerate(idx):
                    xj, pr = X[i][j], P[r]
                    for c in range(k):
                        g[c] += xj * pr[c]
                row = W[j]
                if W0 is not None:
                    g = [g[c] + mu * (row[c] - W0[j][c]) for c in range(k)]
                for c in range(k):
                    row[c] -= lr * g[c]
            for c in range(k):
                t = 0.0
                for r in range(B):
                    t += P[r][c]
                if b0 is not None:
                    t = t + mu * (b[c] - b0[c])
                b[c] -= lr * t


def evaluate(W, b, X, y):
    loss, hits = 0.0, 0
    for x, label in zip(X, y):
        z = _logits(W, b, x)
        best = 0
        for c in range(1, len(z)):
            if z[c] > z[best]:
                best = c
        hits += best == label
        p = _softmax_row(z)[label]
        loss += log(p if p > 1e-12 else 1e-12)
    n = len(y) or 1
    return -loss / n, hits / n


# ---- the device ---------------------------------------------------------------------------


def _hex(nbytes):
    if urandom:
        raw = urandom(nbytes)
    else:  # a port without os.urandom: good enough for a transfer id
        raw = bytes((time.ticks_us() >> (i % 4)) & 255 for i in range(nbytes))
    return "".join("%02x" % v for v in raw)


def chunks(payload, csz, digest, xfer, task_id):
    """The chunk messages of one transfer (protocol 6.1), cut one at a time."""
    n = max(1, -(-len(payload) // csz))
    for i in range(n):
        yield i, dumps(
            {"v": 1, "xfer": xfer, "i": i, "n": n, "size": len(payload), "csz": csz,
             "alg": "sha256", "digest": digest, "meta": {"task_id": task_id},
             "data": payload[i * csz : (i + 1) * csz]}
        )  # fmt: skip


class Device:
    """One device: ``run()`` loops forever (or until ``stop()`` returns true).

    ``cfg`` keys: host, port, project, region, device, data (EFLD path) or X/y, and
    optionally user, password (the device token), seed (default crc32(device) & 0x7fffffff),
    max_chunk (default 1024: small chunks for small RAM), keepalive (30), chunk_delay (0 s
    between upload chunks; the tests use it to stand for a slow link).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.dev = cfg["device"]
        if "X" in cfg:
            self.X, self.y = cfg["X"], cfg["y"]
        else:
            self.X, self.y = load_data(cfg["data"])
        self.seed = cfg.get("seed")
        if self.seed is None:
            import binascii

            self.seed = binascii.crc32(self.dev.encode()) & 0x7FFFFFFF
        self.base = "edgefl/v1/%s/%s/dev/%s/" % (cfg["project"], cfg["region"], self.dev)
        self.model_base = "edgefl/v1/%s/model/" % cfg["project"]
        self.max_chunk = max(MIN_CHUNK, cfg.get("max_chunk", MIN_CHUNK))
        self.mq = None
        self.connected = False
        self.backoff = 0.5
        self.tasks, self.seen, self.latest = [], [], {}
        self.model = None  # (version, digest, W, b)
        self.parts, self.want = None, None  # the download in progress
        self.completed = self.declined = self.resumed = 0
        self.upload = None  # (xfer, chunk index) while an upload runs
        self.resumed_at = None  # (xfer, chunk index) of the last resumed upload
        self.chunk_delay = cfg.get("chunk_delay", 0)  # seconds between chunks: a slow link

    # MQTT link ----------------------------------------------------------------------------
    def _status(self, state):
        msg = {"v": 1, "type": "status", "state": state, "ts": now(), "device": self.dev}
        if state == "online":
            msg["region"], msg["agent"] = self.cfg["region"], AGENT
        return dumps(msg)

    def connect(self):
        """Dial out until connected, backing off 0.5 s doubling to 30 s (protocol 1.2)."""
        c = self.cfg
        while True:
            try:
                self.mq = MQTTClient(
                    "edgefl-%s-%s" % (c["project"], self.dev), c["host"], port=c.get("port", 1883),
                    user=c.get("user", self.dev), password=c.get("password"),
                    keepalive=c.get("keepalive", 30),
                )  # fmt: skip
                self.mq.set_callback(self._on_msg)
                self.mq.set_last_will(self.base + "status", self._status("offline"), True, 1)
                self.mq.connect(clean_session=False)
                self.mq.publish(self.base + "status", self._status("online"), True, 1)
                self.mq.subscribe(self.base + "task", 1)
                if self.want is not None:  # a download in progress: subscribe again
                    self.mq.subscribe(self.model_base + self.want[0] + "/+", 1)
                self.connected, self.backoff = True, 0.5
                return
            except OSError as exc:
                print("%s: cannot connect (%s); retrying in %.1f s" % (self.dev, exc, self.backoff))
                time.sleep(self.backoff)
                self.backoff = min(30.0, self.backoff * 2)

    def _pub(self, topic, payload, qos=1):
        """Publish; QoS 1 blocks until the PUBACK (umqtt.simple). Reconnects and retries on a
        lost link, so the caller knows each acknowledged message for certain. Returns how
        many times the link had to be re-established."""
        redials = 0
        while True:
            if not self.connected:
                redials += 1
                self.connect()
            try:
                self.mq.publish(topic, payload, False, qos)
                return redials
            except OSError:
                self.connected = False

    def _on_msg(self, topic, msg):
        topic = topic.decode() if isinstance(topic, bytes) else topic
        if not msg:
            return  # a cleared retained message
        try:
            if topic == self.base + "task":
                self._on_task(loads(msg))
            elif self.want is not None and topic.startswith(self.model_base + self.want[0] + "/"):
                self._on_chunk(loads(msg))
        except (ValueError, KeyError, TypeError) as exc:
            print("%s: dropping a bad message on %s: %s" % (self.dev, topic, exc))

    # tasks --------------------------------------------------------------------------------
    def _on_task(self, t):
        req = {"task_id": str, "session": str, "round": int, "model_version": str,
               "model_digest": bytes, "train": dict, "chunk_size": int}  # fmt: skip
        if not isinstance(t, dict) or t.get("v") != 1 or t.get("type") != "task":
            raise ValueError("not a v1 task")
        for k, kind in req.items():
            if not isinstance(t.get(k), kind) or isinstance(t.get(k), bool):
                raise ValueError("task field %s missing or mistyped" % k)
        if not isinstance(t.get("deadline"), (int, float)) or isinstance(t["deadline"], bool):
            raise ValueError("task deadline missing or mistyped")
        if t["task_id"] in self.seen:
            return  # QoS 1 redelivery
        attempt = t["task_id"].rsplit(":", 1)[-1]
        key = (t.get("fence", 0), t["round"], int(attempt) if attempt.isdigit() else -1)
        if key <= self.latest.get(t["session"], (-1, -1, -1)):
            return  # stale: a replay, or a controller that lost the session
        self.latest[t["session"]] = key
        self.seen = [*self.seen, t["task_id"]][-32:]
        self.tasks.append(t)

    def _decline(self, t, reason):
        self.declined += 1
        print("%s: declining %s: %s" % (self.dev, t["task_id"], reason))
        if now() > t["deadline"]:
            return
        msg = dumps({"v": 1, "type": "decline", "task_id": t["task_id"], "reason": reason[:512]})
        digest = hashlib.sha256(msg).digest()
        for _, ch in chunks(msg, max(MIN_CHUNK, len(msg)), digest, _hex(16), t["task_id"]):
            self._pub(self.base + "update", ch)

    # model download -----------------------------------------------------------------------
    def _on_chunk(self, c):
        digest = self.want[1]
        if c.get("v") != 1 or c.get("alg") != "sha256" or c.get("digest") != digest:
            self.parts = "mismatch"  # another model under this version: give up (6.3 rule 2)
            return
        i, n, size, csz, data = c["i"], c["n"], c["size"], c["csz"], c["data"]
        if n != max(1, -(-size // csz)) or not 0 <= i < n:
            return  # a bad chunk is dropped
        if len(data) != (csz if i < n - 1 else size - (n - 1) * csz):
            return
        if self.parts is None:
            self.parts = {}
        if isinstance(self.parts, dict):
            self.parts.setdefault(i, data)
            self.parts["n"] = n

    def _download(self, t):
        version, digest = t["model_version"], t["model_digest"]
        self.want, self.parts = (version, digest), None
        flt = self.model_base + version + "/+"
        give_up = now() + min(60.0, t["deadline"] - now())
        next_fetch = now() + 3.0
        try:
            self.mq.subscribe(flt, 1)  # umqtt.simple has no unsubscribe: see the README
            while True:
                p = self.parts
                if p == "mismatch":
                    raise ValueError("model chunks do not match the task's digest")
                if isinstance(p, dict) and len(p) - 1 == p["n"]:
                    break
                if now() > give_up:
                    raise ValueError("model %s did not arrive in time" % version)
                if now() > next_fetch:  # the broker may have lost them: ask (4.2b)
                    fetch = dumps({"v": 1, "type": "fetch", "version": version})
                    self._pub(self.base + "request", fetch)
                    next_fetch = now() + 3.0
                self.mq.check_msg()
                time.sleep(0.01)
        finally:
            self.want = None
        blob = b"".join(p[i] for i in range(p["n"]))
        self.parts = None
        if hashlib.sha256(blob).digest() != digest:
            raise ValueError("model does not match its digest")
        W, b, _, _ = decode_model(blob)
        self.model = (version, digest, W, b)

    # one task -----------------------------------------------------------------------------
    def handle(self, t):
        if now() > t["deadline"]:
            return
        if not self.y:
            self._decline(t, "no local data")
            return
        if "compression" in t:  # a device that cannot MUST decline (protocol 5a)
            enc = t["compression"].get("encoding") if isinstance(t["compression"], dict) else None
            self._decline(t, "update compression %r is not supported by this device" % (enc,))
            return
        mu = t["train"].get("mu", 0.0)
        if not isinstance(mu, (int, float)) or isinstance(mu, bool) or not 0 <= mu < 1e300:
            self._decline(t, "train.mu must be a finite number >= 0, got %r" % (mu,))
            return
        # train.model is informational (4.1a): the model's tensor names decide (decode_model)
        try:
            if self.model is None or self.model[:2] != (t["model_version"], t["model_digest"]):
                self.model = None
                self._download(t)
        except ValueError as exc:
            self._decline(t, str(exc))
            return
        _, _, W0, b0 = self.model
        if len(W0) != len(self.X[0]):
            why = "local data has %d features, the model %d" % (len(self.X[0]), len(W0))
            self._decline(t, why)
            return
        W, b = [row[:] for row in W0], b0[:]
        cfg = t["train"]
        t0 = now()
        train(W, b, self.X, self.y, self.seed, t["round"], float(cfg.get("lr", 0.1)),
              int(cfg.get("batch_size", 32)), int(cfg.get("epochs", 1)), float(mu))  # fmt: skip
        train_s = now() - t0
        loss, acc = evaluate(W, b, self.X, self.y)
        update = dumps(
            {"v": 1, "type": "update", "task_id": t["task_id"], "device": self.dev,
             "model_version": t["model_version"], "num_examples": len(self.y),
             "metrics": {"train_loss": loss, "train_accuracy": acc},
             "tensors": encode_tensors(W, b)}
        )  # fmt: skip
        csz = max(MIN_CHUNK, min(t["chunk_size"], self.max_chunk))
        digest, xfer = hashlib.sha256(update).digest(), _hex(16)
        self.upload = (xfer, 0)
        for i, ch in chunks(update, csz, digest, xfer, t["task_id"]):
            if self.chunk_delay:
                time.sleep(self.chunk_delay)
            self.upload = (xfer, i)
            # the link dropped before chunk i's PUBACK: _pub redials and sends chunk i again,
            # under the same xfer; chunks before i are acknowledged and stay sent (6.2)
            if self._pub(self.base + "update", ch):
                self.resumed += 1
                self.resumed_at = (xfer, i)
                print("%s: resumed upload %s at chunk %d" % (self.dev, xfer, i))
        self.upload = None
        self.completed += 1
        tele = {"train_s": train_s, "examples": len(self.y), "update_bytes": len(update),
                "train_loss": loss, "train_accuracy": acc}  # fmt: skip
        try:
            msg = {"v": 1, "type": "telemetry", "ts": now(), "metrics": tele}
            self.mq.publish(self.base + "telemetry", dumps(msg))
        except OSError:
            self.connected = False

    def run(self, stop=lambda: False):
        while not stop():
            if not self.connected:
                self.connect()
            try:
                self.mq.check_msg()
            except OSError:
                self.connected = False
                continue
            if self.tasks:
                self.handle(self.tasks.pop(0))
            else:
                time.sleep(0.02)
        if self.connected:  # goodbye: offline status, then DISCONNECT (suppresses the will)
            try:
                self.mq.publish(self.base + "status", self._status("offline"), True, 1)
                self.mq.disconnect()
            except OSError:
                pass
