// hiredis 0.14 (Debian): encoding with redisFormatCommandArgv and parsing with the reader API.
#ifndef GATEHOUSE_CHIREDIS_SHIM_H
#define GATEHOUSE_CHIREDIS_SHIM_H
#include <hiredis/hiredis.h>
#endif
