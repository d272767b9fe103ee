/*
 * enum.c - setXXent / getXXent_r / endXXent for every map: pages of
 * PW_ENUM_PAGE records fetched over TCP (docs/protocol.md, "enumeration
 * page"), only when `enumerate yes` is configured.
 *
 * The state is per process (glibc keeps one enumeration per process too),
 * behind a lock, reset in a forked child (pid check). A record is consumed
 * only once it was packed, so ERANGE gives the same record again.
 */
#define _GNU_SOURCE
#include "nss_pwserver.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

struct pwnss_enum {
    pthread_mutex_t lock;
    int op;
    pid_t pid;
    uint64_t next_index;
    int at_end;
    pwc_answer *page;  /* the current page, NULL before the first */
    pwp_reader cursor; /* at the next record of the page */
    uint32_t left;     /* records left in the page */
};

#define PWNSS_ENUM_INIT(o) {PTHREAD_MUTEX_INITIALIZER, (o), 0, 0, 0, NULL, {NULL, NULL}, 0}
pwnss_enum pwnss_enum_passwd = PWNSS_ENUM_INIT(PW_OP_PASSWD_ENUM);
pwnss_enum pwnss_enum_group = PWNSS_ENUM_INIT(PW_OP_GROUP_ENUM);
pwnss_enum pwnss_enum_shadow = PWNSS_ENUM_INIT(PW_OP_SHADOW_ENUM);

static pwnss_enum *const all_enums[] = {&pwnss_enum_passwd, &pwnss_enum_group, &pwnss_enum_shadow};

static void atfork_prepare(void)
{
    for (size_t i = 0; i < sizeof all_enums / sizeof *all_enums; i++)
        pthread_mutex_lock(&all_enums[i]->lock);
}

static void atfork_release(void)
{
    for (size_t i = sizeof all_enums / sizeof *all_enums; i-- > 0;)
        pthread_mutex_unlock(&all_enums[i]->lock);
}

__attribute__((constructor)) static void pwnss_enum_init(void)
{
    pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

/* Back to the first record. Lock held. */
static void reset(pwnss_enum *e)
{
    if (e->page) {
        pwc_answer_free(e->page);
        free(e->page);
        e->page = NULL;
    }
    e->next_index = 0;
    e->at_end = 0;
    e->left = 0;
    e->pid = getpid();
}

enum nss_status pwnss_enum_reset(pwnss_enum *e)
{
    int saved = errno;
    pthread_mutex_lock(&e->lock);
    reset(e);
    pthread_mutex_unlock(&e->lock);
    errno = saved;
    return NSS_STATUS_SUCCESS;
}

/* Fetches the page at e->next_index. Lock held. */
static int fetch_page(pwnss_enum *e)
{
    if (!e->page) {
        e->page = malloc(sizeof *e->page);
        if (!e->page)
            return -ENOMEM;
        e->page->heap = NULL;
    }
    pwc_answer_free(e->page);
    int rc = pwc_query(e->op, NULL, e->next_index, e->page);
    if (rc < 0)
        return rc;
    if (e->page->status == PW_NOTFOUND) {
        e->at_end = 1;
        return 0;
    }
    /* shape checked by pwc_query */
    pwp_reader r = e->page->payload;
    pw_page_view page;
    if (pw_get_page(&r, &page) < 0)
        return -EAGAIN;
    if (!page.has_next) {
        e->at_end = 1;
    } else {
        if (page.next <= e->next_index) /* a server must move forward */
            e->at_end = 1;
        e->next_index = page.next;
    }
    e->left = page.count;
    e->cursor = page.records;
    return 0;
}

int pwnss_enum_next(pwnss_enum *e, pwc_pack_fn pack, void *result, char *buf, size_t buflen)
{
    int rc;
    pthread_mutex_lock(&e->lock);
    if (e->pid != getpid())
        reset(e); /* a forked child: the page is its own copy; start over */
    if (!pwc_enumerate_enabled()) {
        rc = -ENOENT;
        goto out;
    }
    while (e->left == 0) {
        if (e->at_end) {
            rc = -ENOENT;
            goto out;
        }
        rc = fetch_page(e);
        if (rc < 0)
            goto out;
    }
    pwp_reader rec = e->cursor;
    rc = pack(&rec, result, buf, buflen);
    if (rc == 0 || rc == -EAGAIN) { /* packed, or malformed: move past it */
        if (rc == -EAGAIN && pwp_skip(&e->cursor) == 0)
            rec = e->cursor;
        e->cursor = rec;
        e->left--;
    }
out:
    pthread_mutex_unlock(&e->lock);
    return rc;
}
