import numpy as np
import kvpool


def test_put_get(pool, unique):
    c = kvpool.Client(pool.master)
    c.put(unique + "a", b"hello")
    assert c.get(unique + "a") == b"hello"
    arr = np.arange(1 << 20, dtype=np.uint8)
    c.put(unique + "b", arr)
    out = np.zeros_like(arr)
    assert c.get_into(unique + "b", out) == arr.nbytes
    assert (out == arr).all()
    assert c.get(unique + "missing") is None
