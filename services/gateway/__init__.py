"""The gateway's endpoint picker (Gantry EPP): an Envoy ``ext_proc`` server speaking the GIE endpoint picker
protocol, deciding with the routing core; Envoy proxies the bytes."""
