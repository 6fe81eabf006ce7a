# A disk whose every read takes delay= seconds; it counts callbacks running at once.
# model= picks the thread model by its nbdkit name (parallel, serialize_requests, ...).
import threading
import time

import nbdkit

API_VERSION = 2
model, delay = "serialize_all_requests", 0.05
active = max_active = 0
count_lock = threading.Lock()


def config(key, value):
    global model, delay
    if key == "model":
        model = value
    elif key == "delay":
        delay = float(value)
    else:
        raise RuntimeError(f"unknown parameter {key}")


def thread_model():
    return getattr(nbdkit, "THREAD_MODEL_" + model.upper())


def open(readonly):
    return 1


def get_size(h):
    return 1 << 20


def pread(h, buf, offset, flags):
    global active, max_active
    with count_lock:
        active += 1
        max_active = max(max_active, active)
    time.sleep(delay)
    buf[:] = bytes(len(buf))
    with count_lock:
        active -= 1
