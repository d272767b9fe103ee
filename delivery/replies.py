"""Per-recipient replies shared by pdeliveryd and pdelivery (docs/delivery.md
lists when each is given). Kept apart so that pdelivery, one process per
message, does not import the daemon's asyncio machinery."""

from delivery.lmtp import Reply

R_RCPT_OK = Reply(250, "2.1.5", "recipient OK")
R_NO_USER = Reply(550, "5.1.1", "no such user")
R_BAD_ADDRESS = Reply(550, "5.1.3", "bad recipient address")
R_FROZEN = Reply(450, "4.2.1", "mailbox being moved, try again later")
R_LOOKUP_DOWN = Reply(451, "4.4.3", "user directory unavailable, try again later")
R_WRONG_HOST = Reply(451, "4.3.0", "mailbox is not on this host, try again later")
R_LOOP = Reply(550, "5.4.6", "mail loop: already delivered to this user")
R_STORAGE_DOWN = Reply(451, "4.3.0", "storage unavailable, try again later")
R_STORAGE_FULL = Reply(452, "4.3.1", "insufficient storage, try again later")
R_LOCAL_ERROR = Reply(451, "4.3.0", "local error in processing, try again later")
R_NO_ROUTE = Reply(451, "4.4.0", "no mailhost for user")


def store_unavailable(host: str, why: object) -> Reply:
    """The reply of each recipient whose storage host could not take the message."""
    return Reply(451, "4.4.1", f"storage host {host} unavailable: {why}")
