import numpy as np


def test_round_trip_mock(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 16
    """)
    with server.client() as c:
        v = c.embed(["hello", "world"])
        again = c.embed(["hello"])
    assert v.shape == (2, 16) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(v[0], again[0])
