import requests


def test_healthz_reports_database_and_store(stack):
    reply = requests.get(f"{stack.base}/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "checks": {"database": "ok", "object_store": "ok"}}
    assert reply.headers["X-Request-ID"]


def test_upload_and_download_round_trip(stack, user):
    body = b"hello drive\n" * 1000
    put = requests.put(f"{stack.base}/v1/files/notes/a.txt", data=body, headers=user.auth)
    assert put.status_code == 201, put.text
    got = requests.get(f"{stack.base}/v1/files/notes/a.txt", headers=user.auth)
    assert got.status_code == 200
    assert got.content == body
    assert got.history[0].status_code == 302
