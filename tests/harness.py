"""Integration-test helpers on top of ``edgefl.deploy.Deployment``: rogue devices, a flaky link."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgefl import deploy
from edgefl.controller import Controller, SessionConfig
from edgefl.fleet.simulate import Fleet
from edgefl.protocol import Topics, decode, encode
from edgefl.store.base import RoundRecord
from edgefl.tasks import digits
from edgefl.transport import parse_broker_url


class Deployment(deploy.Deployment):
    """The product's deployment builder, on a fresh project per test, with digits defaults."""

    def __init__(self, url: str, workdir: Path, **kwargs: Any) -> None:
        super().__init__(workdir, project=deploy.random_project(), broker_url=url, **kwargs)

    def start_fleet(  # type: ignore[override]
        self, n_devices: int, partition_size: int | None = None, **kwargs: Any
    ) -> Fleet:
        return super().start_fleet(n_devices, partition_size=partition_size, **kwargs)

    def controller(self, **kwargs: Any) -> Controller:
        return self.start_controller(evaluator=digits.evaluator, **kwargs)

    def run_session(self, ctl: Controller, **cfg: Any) -> tuple[str, list[RoundRecord]]:
        config = SessionConfig(**{"train": {"lr": 0.1, "batch_size": 32}, **cfg})
        ctl.create_session(config, digits.initial_weights(config.train.get("model", "softmax")))
        ctl.run(config.session_id)
        return config.session_id, ctl.store.list_rounds(config.session_id)


def completed_accuracies(rounds: list[RoundRecord]) -> list[float]:
    return [r.metrics["accuracy"] for r in rounds if r.status == "completed"]


class RogueDevice:
    """A raw paho client posing as a device that misbehaves in a chosen way."""

    def __init__(
        self, url: str, project: str, region: str, device: str, mode: str, on_task=None
    ) -> None:
        self.topics = Topics(project)
        self.region, self.device, self.mode = region, device, mode
        self.tasks: list[dict] = []
        self.on_task = on_task
        addr = parse_broker_url(url)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"rogue-{device}", protocol=paho.MQTTv311
        )
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        task_topic = self.topics.device(region, device, "task")
        self.client.subscribe(task_topic, qos=1)
        time.sleep(0.2)
        self.client.publish(
            self.topics.device(region, device, "status"),
            encode("status", state="online", ts=time.time()),
            qos=1,
            retain=True,
        ).wait_for_publish(5)

    def _on_message(self, _c, _u, msg) -> None:
        task = decode(msg.payload, "task")
        self.tasks.append(task)
        if self.on_task is not None:
            self.on_task(self, task)

    def publish_update(self, payload: bytes) -> None:
        self.client.publish(
            self.topics.device(self.region, self.device, "update"), payload, qos=1
        ).wait_for_publish(5)

    def stop(self) -> None:
        self.client.publish(
            self.topics.device(self.region, self.device, "status"), b"", qos=1, retain=True
        ).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


class CuttingProxy:
    """A loopback TCP proxy that cuts its connections once, mid-upload.

    After the client->broker stream contains ``marker`` (e.g. an update topic), it forwards
    ``cut_after`` more bytes and then closes both sockets, as a flaky link would.
    """

    def __init__(self, target_host: str, target_port: int, marker: bytes, cut_after: int) -> None:
        self.target = (target_host, target_port)
        self.marker, self.cut_after = marker, cut_after
        self.cuts = 0
        self.connections = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._armed = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self.target)
            state = {"seen": False, "sent": 0}
            threading.Thread(
                target=self._pump, args=(client, upstream, state, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, state, False), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upward: bool) -> None:
        window = b""
        try:
            while True:
                data = src.recv(4096)
                if not data:
                    break
                if upward and self._armed:
                    window = (window + data)[-4096:]
                    if not state["seen"] and self.marker in window:
                        state["seen"] = True
                    if state["seen"]:
                        room = self.cut_after - state["sent"]
                        if len(data) >= room:
                            dst.sendall(data[:room])
                            self._armed = False
                            self.cuts += 1
                            break
                        state["sent"] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._srv.close()
