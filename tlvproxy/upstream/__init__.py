"""The upstream half of the gateway: balancing, health, multiplexed connections, pools."""
