-- osteonode auto-routing for Orthanc (Lua).
--
-- When a CT series has received no new instance for StableAge seconds,
-- Orthanc sends the whole series by C-STORE to the DICOM modality named
-- "osteonode" (declared in DicomModalities of the Orthanc configuration, or
-- with PUT /modalities/osteonode). osteonode answers later with a SEG and an
-- SR in the same study.
--
-- Why per series and not OnStableStudy: the SEG and SR that osteonode sends
-- back are new series of the same study. A study-level rule would see the
-- study change, become stable again and resend it, forever. Filtering on
-- Modality == "CT" also keeps the results (Modality SEG / SR) from going back.
--
-- Load it with "LuaScripts": ["orthanc-autoroute.lua"] in the Orthanc
-- configuration (see deploy/orthanc.json and docs/admin.md).

OSTEONODE_MODALITY = 'osteonode'

function OnStableSeries(seriesId, tags, metadata)
   if tags['Modality'] ~= 'CT' then
      return
   end
   -- Queue an asynchronous store job (visible in /jobs); a synchronous call
   -- would block Orthanc's Lua engine for the whole transfer.
   local request = {}
   request['Resources'] = { seriesId }
   request['Asynchronous'] = true
   local answer = ParseJson(RestApiPost('/modalities/' .. OSTEONODE_MODALITY .. '/store',
                                        DumpJson(request)))
   print('osteonode auto-routing: CT series ' .. seriesId .. ' queued as job ' .. answer['ID'])
end
