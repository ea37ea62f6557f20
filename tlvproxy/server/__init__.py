"""The gateway's listeners: HTTP/1.1 connections, REST, WebSocket and admin."""
