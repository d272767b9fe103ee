/*
 * pd_lmtp_server.h - the LMTP server of `pdelivery -l` (Sendmail's F=z
 * mailer on stdin/stdout), sans I/O: bytes in, events out, bytes to send.
 * The C twin of delivery/lmtp.py's LMTPServerConnection (same commands,
 * replies, limits and events); pdelivery decides each RCPT and the fate of
 * each message, the machine answers everything else.
 */
#ifndef PD_LMTP_SERVER_H
#define PD_LMTP_SERVER_H

#include <stddef.h>

#include "pd.h"

enum pd_event { PD_NEED_DATA, PD_CLOSED, PD_RCPT, PD_MESSAGE, PD_PEER_ERROR, PD_NO_MEMORY };

typedef struct {
    char *address;
    pd_route route;                /* pdelivery's: where it goes */
} pd_rcpt;

typedef struct {
    char *buf;
    size_t len, cap;
} pd_bytes;

typedef struct {
    const pd_conf *limits;         /* command_line_max, message_size_max, ... */
    const char *hostname;
    pd_bytes in, out, body;
    int eof, bad, phase;
    /* the transaction */
    char *sender;                  /* NULL before MAIL */
    pd_rcpt *rcpts;
    size_t nrcpts, rcpts_cap;
    char *pending;                 /* the RCPT waiting for pd_srv_answer_rcpt */
    char queue_id[PD_QUEUE_ID_MAX + 1];   /* XQUEUEID of MAIL, "" when none */
    size_t scan;
    int too_big, bdat_last, bdat_started;
    size_t bdat_left;
} pd_srv;

/* Starts a session: the 220 greeting is in the output. */
int pd_srv_init(pd_srv *s, const char *hostname, const pd_conf *limits);
void pd_srv_free(pd_srv *s);
/* Feeds bytes from the peer; n == 0 means it closed. 0, or -1 (memory). */
int pd_srv_receive(pd_srv *s, const char *data, size_t n);
/* The next event. PD_NEED_DATA: send the output, then feed more.
 * PD_RCPT: s->pending (from s->sender) awaits pd_srv_answer_rcpt.
 * PD_MESSAGE: s->body (s->body.len bytes, CRLF line ends, unstuffed) for
 * s->rcpts awaits pd_srv_answer_message. PD_CLOSED and PD_PEER_ERROR: send
 * the output and stop. */
int pd_srv_next(pd_srv *s);
int pd_srv_answer_rcpt(pd_srv *s, const pd_reply *r, const pd_route *route);
/* One reply per recipient of the message, in RCPT order. */
int pd_srv_answer_message(pd_srv *s, const pd_reply *replies);
/* Queues one reply (as the machine formats them). */
int pd_srv_reply(pd_srv *s, const pd_reply *r);

#endif /* PD_LMTP_SERVER_H */
