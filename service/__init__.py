"""lipcert's BentoML service: certified predictions from the exported 1-Lipschitz models.

``service.service:LipCert`` is the service class (``bentoml serve`` from the repository root).
Importing this package does nothing else: the models are loaded when BentoML builds the service.
"""
