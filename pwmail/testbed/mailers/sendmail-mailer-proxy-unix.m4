OSTYPE(`debian')dnl
define(`LOCAL_MAILER_PATH', `[IPC]')dnl
define(`LOCAL_MAILER_ARGS', `FILE /run/lmtp-proxy.sock')dnl
define(`LOCAL_MAILER_EOL', `\r\n')dnl
MODIFY_MAILER_FLAGS(`LOCAL', `lsDFMA5:/|@qnmzX')dnl
