import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_bentoml_app_at_a_time():
    """Let several in-process ``LipCert.to_asgi()`` apps live in one test process.

    Each app registers BentoML's HTTP metrics (``bentoml_service_request_*``) in Prometheus'
    one default registry on its first request, so a second app in the same process (another
    test module's client) collides with ``DuplicateTimeseries``. A server process only ever
    builds one app; for tests, the newer app's collector replaces the older one.
    """
    from prometheus_client.registry import CollectorRegistry, DuplicateTimeseries

    original = CollectorRegistry.register

    def register(self, collector):
        try:
            return original(self, collector)
        except DuplicateTimeseries:
            with self._lock:
                stale = {self._names_to_collectors[n] for n in self._get_names(collector)
                         if n in self._names_to_collectors}
            for old in stale:
                self.unregister(old)
            return original(self, collector)

    CollectorRegistry.register = register
    yield
    CollectorRegistry.register = original
