"""The SSH bastion (docs/ssh.md): ``kgpu serve`` listens for SSH on ``KGPU_SSH_PORT`` and carries
each login into the one pod whose rental pinned the key.

- ``keys.py``: the public keys a rental may pin, minted pairs, the bastion's host key;
- ``access.py``: who may enter which rental (the database's word, asked at login and at every
  channel), and the activity a connection reports;
- ``pod_session.py``: a session channel (command, shell, ``sftp``) as a process in the pod;
- ``fd_stream.py``: its pipes and terminal read and written on the event loop by number, closed once;
- ``forward.py``: ``-L``/``-D`` connections opened from inside the pod's network;
- ``bastion.py``: the asyncssh server that ties them together, its limits and its watcher;
- ``flow.py``: a fix to asyncssh's receive window (an upload otherwise queued without bound).
"""
