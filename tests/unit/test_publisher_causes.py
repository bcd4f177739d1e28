"""How connection failures are named (pure): the cause key decides what is logged at warning."""

from __future__ import annotations

import socket
import ssl

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.delivery.mqtt.publisher import classify


def _wrapped(exc: OSError) -> aiomqtt.MqttError:
    # What aiomqtt raises for a socket error: a plain MqttError raised from None.
    try:
        try:
            raise exc
        except OSError as inner:
            raise aiomqtt.MqttError(str(inner)) from None
    except aiomqtt.MqttError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "key"),
    [
        (_wrapped(ConnectionRefusedError(111, "Connection refused")), "refused"),
        (_wrapped(ssl.SSLCertVerificationError(1, "certificate verify failed")), "tls"),
        (_wrapped(socket.gaierror(-2, "Name or service not known")), "name"),
        (_wrapped(OSError(113, "No route to host")), "network"),
        (TimeoutError(), "timeout"),
        (
            MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x87)),
            "not-authorized",
        ),
        (
            MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x86)),
            "not-authorized",
        ),
        (MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x85)), "client-id"),
        (MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x88)), "refused-136"),
        (
            aiomqtt.MqttCodeError(ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)),
            "session-taken-over",
        ),
        # paho's own codes are no broker refusal: the link went away while connecting
        # (seen as a warning "refused-4" when a second client took the session over).
        (aiomqtt.MqttCodeError(MQTTErrorCode.MQTT_ERR_NO_CONN), "closed"),
        (aiomqtt.MqttCodeError(MQTTErrorCode.MQTT_ERR_CONN_LOST), "closed"),
    ],
)
def test_each_failure_has_a_stable_cause(exc: BaseException, key: str) -> None:
    cause = classify(exc, "shopfloor-gw-1")
    assert cause.key == key
    assert cause.text


def test_a_takeover_names_the_client_id() -> None:
    rc = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    cause = classify(aiomqtt.MqttCodeError(rc), "shopfloor-gw-1")
    assert "'shopfloor-gw-1'" in cause.text
