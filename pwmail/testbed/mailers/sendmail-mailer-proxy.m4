OSTYPE(`debian')dnl
define(`LOCAL_MAILER_PATH', `[IPC]')dnl
define(`LOCAL_MAILER_ARGS', `TCP 127.0.0.1 24')dnl
define(`LOCAL_MAILER_EOL', `\r\n')dnl
MODIFY_MAILER_FLAGS(`LOCAL', `lsDFMA5:/|@qnmzX')dnl
