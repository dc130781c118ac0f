"""edgefl: federated learning for IoT fleets over MQTT.

Importing this package must stay cheap: the device agent imports ``edgefl.protocol`` and
``edgefl.transport`` on small devices, so nothing here may pull in server dependencies.
"""

__version__ = "0.1.0"
