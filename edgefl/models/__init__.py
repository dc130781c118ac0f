"""Reference models shared by devices (training) and the server (evaluation).

Lives in the base package so that the server never imports the device agent.
"""
