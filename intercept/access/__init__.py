"""Cluster access for the local process: every Service by the names a pod would use.

- :mod:`.names` (sans-IO): Services and EndpointSlices -> which local address answers to
  which names, where each dials in the cluster; the hosts file's lines; the
  ``*_SERVICE_HOST`` variables pointed at the local addresses.
- :mod:`.hostsfile` (sans-IO): the managed block in ``/etc/hosts`` (root mode), removed
  leaving the file byte for byte as it was.
- :mod:`.forward`: a listener per local address and port, each connection dialled from
  the agent's pod (``direct-tcpip``), the fence's refusal surfaced.
- :mod:`.modes`: which mode this machine gets, and why; :mod:`.isolate` (a private mount
  namespace for COMMAND) and :mod:`.guard` (the hosts block's guard) are those modes.
"""
