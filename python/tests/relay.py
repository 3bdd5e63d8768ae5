"""A relay between two SQS queues that can change a message on the way: a step message
corrupted (or its payload lost) in flight, between a live run's executor and the controller.

The executor publishes to the relay's inbox; the controller reads the outbox. Each message is
received, passed to ``change`` (which may also act on the world, e.g. delete an S3 object),
sent on with its message attributes, then deleted from the inbox."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3

# (body, string message attributes) -> what to send on instead.
Change = Callable[[str, dict[str, str]], tuple[str, dict[str, str]]]


@dataclass
class Relay:
    inbox_url: str
    outbox_url: str
    change: Change
    # What was sent on, in order: (body, attributes).
    relayed: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.errors:
            raise AssertionError(f"the relay failed: {self.errors[0]!r}") from self.errors[0]

    def _run(self) -> None:
        sqs = boto3.client("sqs")
        while not self._stop.is_set():
            try:
                got = sqs.receive_message(
                    QueueUrl=self.inbox_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=1,
                    MessageAttributeNames=["All"],
                )
                for message in got.get("Messages", []):
                    self._relay(sqs, message)
            except Exception as exc:  # surfaced by stop()
                self.errors.append(exc)
                return

    def _relay(self, sqs: Any, message: dict[str, Any]) -> None:
        attributes = {
            name: value["StringValue"]
            for name, value in message.get("MessageAttributes", {}).items()
            if value.get("DataType") == "String"
        }
        body, attributes = self.change(message["Body"], attributes)
        sqs.send_message(
            QueueUrl=self.outbox_url,
            MessageBody=body,
            MessageAttributes={
                name: {"DataType": "String", "StringValue": value}
                for name, value in attributes.items()
            },
        )
        self.relayed.append((body, attributes))
        sqs.delete_message(QueueUrl=self.inbox_url, ReceiptHandle=message["ReceiptHandle"])
