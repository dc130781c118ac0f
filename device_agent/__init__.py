"""The edgefl device agent: dials out to MQTT, trains locally, publishes chunked CBOR updates.

Depends only on paho-mqtt, cbor2 and numpy (plus ``edgefl.protocol``/``edgefl.transport``,
which are pure Python on the same three packages).
"""
