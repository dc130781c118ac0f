"""Brokers: the embedded amqtt broker (zero setup) and a Mosquitto runner."""
