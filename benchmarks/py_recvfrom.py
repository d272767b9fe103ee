"""A minimal Python UDP server: a recvfrom/sendto loop echoing each
datagram (the peer pwserver is compared with). `python py_recvfrom.py PORT`."""

import socket
import sys

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(data, addr)
