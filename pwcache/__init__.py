"""pwcache: the password server `pwserver`, its C table, and its clients."""
